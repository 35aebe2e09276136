"""What the exactness tests run against the reference: each implementation and, for the
fused one, each of its paths (fused.PATHS: spans, rows), forced for the whole test by
conftest's `fused_path` fixture through a test's `path` parameter."""

from sysattn_exp.attention.fused import PATHS

IMPL_PATHS = [("fused", path) for path in PATHS] + [("eager", None)]
