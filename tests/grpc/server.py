"""A gRPC Greeter server (helloworld.proto) for tests/grpc.rs.

Usage: server.py STUBS_DIR [PORT]. The stubs are generated into STUBS_DIR by
`python -m grpc_tools.protoc`; the port is the argument (0 for any free one), else $PORT
(as `squall up --driver spawn` gives it). Every reply names the server's port, so a test
can tell which server answered. It prints `serving on PORT` to standard error once it
serves, and exits on SIGTERM.
"""

import os
import signal
import sys
import time
from concurrent import futures

sys.path.insert(0, sys.argv[1])

import grpc  # noqa: E402
import helloworld_pb2  # noqa: E402
import helloworld_pb2_grpc  # noqa: E402

# The port asked for (0: any free one), then the one bound.
PORT = int(sys.argv[2]) if len(sys.argv) > 2 else int(os.environ["PORT"])


class Greeter(helloworld_pb2_grpc.GreeterServicer):
    def SayHello(self, request, context):
        if request.delay:
            time.sleep(request.delay)
        if request.fail_with:
            code = next(c for c in grpc.StatusCode if c.value[0] == request.fail_with)
            context.abort(code, f"no greeting for {request.name} from {PORT}")
        return helloworld_pb2.HelloReply(message=f"Hello {request.name} from {PORT}")

    def SayHelloStreamReply(self, request, context):
        for i in range(request.count):
            yield helloworld_pb2.HelloReply(message=f"Hello {request.name} #{i} from {PORT}")


def main():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    helloworld_pb2_grpc.add_GreeterServicer_to_server(Greeter(), server)
    global PORT
    PORT = server.add_insecure_port(f"127.0.0.1:{PORT}")
    server.start()
    signal.signal(signal.SIGTERM, lambda *_: server.stop(0))
    print(f"serving on {PORT}", file=sys.stderr, flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
