"""Build hook for the one compiled part: the OTLP traces decoder (collector/_otlpfast.c).

Everything else is declared in pyproject.toml. The extension is optional: an
install on a machine without a C compiler (or Python headers) still succeeds,
and the collector then decodes with its pure-Python code (collector/otlp_c.py
says which decoder is in use; so do /healthz and /metrics).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "collector._otlpfast",
            sources=["collector/_otlpfast.c"],
            optional=True,
            extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wno-missing-field-initializers"],
        )
    ]
)
