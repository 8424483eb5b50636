"""The one native part of fdbroker, fdbroker._native: the broker's data plane for prefetched GET tokens and the
client's lean Redeem (docs/performance.md).

Everything else is in pyproject.toml. The extension is optional: without a C compiler or Python's headers the
install goes on without it and fdbroker runs its pure-Python path (fdbroker/broker/fastpath.py), as it does with
FDBROKER_NATIVE=0.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "fdbroker._native",
            ["src/fdbroker/_native.c"],
            optional=True,
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-missing-field-initializers"],
        )
    ]
)
