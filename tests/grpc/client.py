"""A gRPC Greeter client (helloworld.proto) for tests/grpc.rs: one channel, one scenario,
its outcome printed as JSON on standard output.

Usage: client.py STUBS_DIR TARGET SCENARIO [ARGS...], where SCENARIO is
  unary COUNT DELAY       COUNT SayHello calls at once, each answered after DELAY s:
                          {"messages": [...]}, in the order the calls were made
  stream COUNT            one SayHelloStreamReply of COUNT replies: {"messages": [...]}
  fail CODE               a SayHello the server fails with status CODE: {"code", "details"}
  deadline DELAY TIMEOUT  a SayHello the server answers after DELAY s, with a deadline of
                          TIMEOUT s: {"code", "details"}
"""

import json
import sys

sys.path.insert(0, sys.argv[1])

import grpc  # noqa: E402
import helloworld_pb2  # noqa: E402
import helloworld_pb2_grpc  # noqa: E402


def failure(error):
    return {"code": error.code().name, "details": error.details()}


def main():
    target, scenario, args = sys.argv[2], sys.argv[3], sys.argv[4:]
    with grpc.insecure_channel(target) as channel:
        greeter = helloworld_pb2_grpc.GreeterStub(channel)
        if scenario == "unary":
            calls = [
                greeter.SayHello.future(
                    helloworld_pb2.HelloRequest(name=f"call {i}", delay=float(args[1])),
                    timeout=30,
                )
                for i in range(int(args[0]))
            ]
            outcome = {"messages": [call.result().message for call in calls]}
        elif scenario == "stream":
            request = helloworld_pb2.HelloRequest(name="stream", count=int(args[0]))
            outcome = {
                "messages": [r.message for r in greeter.SayHelloStreamReply(request, timeout=30)]
            }
        elif scenario == "fail":
            request = helloworld_pb2.HelloRequest(name="nobody", fail_with=int(args[0]))
            try:
                greeter.SayHello(request, timeout=30)
                outcome = {"code": "OK", "details": None}
            except grpc.RpcError as error:
                outcome = failure(error)
        elif scenario == "deadline":
            request = helloworld_pb2.HelloRequest(name="late", delay=float(args[0]))
            try:
                greeter.SayHello(request, timeout=float(args[1]))
                outcome = {"code": "OK", "details": None}
            except grpc.RpcError as error:
                outcome = failure(error)
        else:
            sys.exit(f"unknown scenario {scenario!r}")
    print(json.dumps(outcome), flush=True)


if __name__ == "__main__":
    main()
