"""The activation table is the one source of the activation codes: the generated C++ header,
the kernels' switch cases, the backends' code maps and the drop-in modules all follow it."""

from __future__ import annotations

import re
from pathlib import Path

from torch import nn

from gradreg_kernels import activation_table as table
from gradreg_kernels.activation_math import activation_spec, spec_by_name
from gradreg_kernels.backends import cpu, cuda
from gradreg_kernels.nn.modules import DROP_IN_OF
from gradreg_kernels.rules.activation import ACTIVATION_TYPES

ROOT = Path(__file__).resolve().parent.parent
CODE_USE = re.compile(r"\bact_code::k(\w+)")


def test_committed_header_is_the_generated_one():
    """Regenerate the header in memory: it must equal the committed file (run
    ``activation_table.write_header()`` after editing the table)."""
    assert table.HEADER_PATH.read_text() == table.header_text()


def test_header_constants_are_the_table_codes():
    text = table.HEADER_PATH.read_text()
    found = {m[0]: int(m[1]) for m in re.findall(r"constexpr int k(\w+) = (\d+);", text)}
    want = {table._camel(k.name): k.code for k in table.ACTIVATIONS if k.native}
    assert found == want


def test_kernels_use_named_codes_only():
    """Every act_code:: name a kernel uses exists, and no switch on an activation falls back
    to a bare integer case."""
    known = {table._camel(k.name) for k in table.ACTIVATIONS if k.native}
    for path in [ROOT / "csrc/cuda/activation.cu", ROOT / "csrc/cpu/smooth.cpp",
                 ROOT / "csrc/cpu/smooth_output.cpp"]:
        text = path.read_text()
        assert set(CODE_USE.findall(text)) <= known, path
        assert '#include "../common/activation_codes.h"' in text, path
    cu = (ROOT / "csrc/cuda/activation.cu").read_text()
    assert not re.search(r"case \d+:", cu)
    assert not re.search(r"act == \d", cu)


def test_triton_kernels_use_named_codes_only():
    text = (ROOT / "gradreg_kernels/backends/triton/elementwise.py").read_text()
    assert not re.search(r"ACT == \d", text)


def test_backends_read_the_table():
    assert cuda.ACT_CODES == table.NATIVE_CODES
    assert set(cuda.PIECEWISE) == set(table.PIECEWISE_CODES)
    assert all(cpu._SMOOTH_KINDS[n] == table.BY_NAME[n].code for n in cpu._SMOOTH_KINDS)


def test_every_row_has_a_spec_a_rule_and_a_drop_in():
    for k in table.ACTIVATIONS:
        module = nn.GELU(approximate="tanh") if k.name == "gelu_tanh" else k.module()
        spec = activation_spec(module)
        assert spec is not None and spec.name == k.name and spec.smooth == k.smooth
        assert spec_by_name(k.name, *k.params(module)).params == spec.params
        assert k.module in ACTIVATION_TYPES and k.module in DROP_IN_OF
    assert activation_spec(nn.GELU(approximate="tanh")).name == "gelu_tanh"
    assert activation_spec(nn.ReLU6()).name == "hardtanh"
    assert activation_spec(nn.Linear(2, 2)) is None
