"""A WSGI app that says how often this process was asked for `/prime` before the request it
answers: 1 in a clone primed with `--prime /prime` (the spare served it to itself), 0
otherwise."""

PRIMED = 0


def app(environ, start_response):
    global PRIMED
    if environ["PATH_INFO"] == "/prime":
        PRIMED += 1
    body = f"primed={PRIMED}\n".encode()
    start_response("200 OK", [("Content-Length", str(len(body)))])
    return [body]
