"""A WSGI app that answers a draw from NumPy's legacy global generator, which its import
seeds; a fork copies that generator's state, and NumPy does not reseed it in the child, so
clones answer different numbers only if the zygote reseeded it. `/seeded` answers the first
draw after the same seed, which no clone may repeat."""

import numpy

numpy.random.seed(1234)


def app(environ, start_response):
    if environ["PATH_INFO"] == "/seeded":
        value = numpy.random.RandomState(1234).random_sample()
    else:
        value = numpy.random.random_sample()
    body = f"{value!r}\n".encode()
    start_response("200 OK", [("Content-Length", str(len(body)))])
    return [body]
