"""Layer rules: each layer kind's part in the four passes, in one place per kind. Importing
this package imports every rule file, each of which registers the module types and traced
calls it runs (``gradreg_kernels.registry``)."""

from . import (  # noqa: F401
    activation,
    combine,
    conv,
    conv_transpose,
    dropout,
    group_norm,
    linear,
    norm,
    pool,
    pool1d,
    prelu,
    reshape,
    sync_norm,
    upsample,
)
