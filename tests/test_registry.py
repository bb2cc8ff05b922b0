"""Registry: names, listing, typed errors, shared layouts, plugins from files and entry points."""

import itertools
import math
import random
import subprocess
import sys
import textwrap

import pytest
import torch

import attnbench
from attnbench import registry
from attnbench.measure import flops as F
from conftest import ROOT, randomize_
from equivalence import assert_same_function

BUILTINS = {"mha.sdpa", "mha.math", "sra.conv", "sra.linear"}


def test_builtins_listed():
    assert BUILTINS <= set(attnbench.list_impls())
    assert attnbench.list_impls("sra.*") == ["sra.conv", "sra.linear"]


def test_contract_shapes():
    for name in sorted(n for names in ALGORITHMS.values() for n in names):  # the package's own
        try:
            m = attnbench.create(name, dim=48, heads=3).eval()
        except ValueError:  # a design that refuses odd head counts (cswin.cross)
            m = attnbench.create(name, dim=48, heads=4).eval()
        y = m(torch.randn(2, 16, 12, 48))
        assert y.shape[0] == 2 and y.shape[-1] == 48, name


def test_unknown_name_suggests_close_matches():
    with pytest.raises(attnbench.UnknownImplError) as e:
        attnbench.create("mha.sdp", dim=32, heads=2)
    assert "mha.sdpa" in e.value.close
    assert "did you mean 'mha.sdpa'" in str(e.value)
    assert isinstance(e.value, attnbench.AttnbenchError)


def test_parameter_errors_are_typed():
    with pytest.raises(attnbench.ParamError, match="sr_ratio"):
        attnbench.create("sra.conv", dim=32, heads=2, sr_ratoi=2)
    with pytest.raises(attnbench.ParamError, match="must be int"):
        attnbench.create("sra.conv", dim=32, heads=2, sr_ratio="2")
    with pytest.raises(attnbench.ParamError, match="must be bool"):
        attnbench.create("mha.sdpa", dim=32, heads=2, qkv_bias=1)


def test_params_and_descriptions():
    spec = attnbench.get_spec("sra.linear")
    assert spec.params == {"pool_size": 7, "qkv_bias": True}
    assert spec.family == "sra" and spec.description


def _builtin_algorithms():
    """algorithm -> sorted names of the package's own implementations (plugins other tests load are not)."""
    groups = {}
    for name, spec in registry.specs().items():
        if spec.cls.__module__.startswith("attnbench.impls."):
            groups.setdefault(spec.algorithm, []).append(name)
    return groups


ALGORITHMS = _builtin_algorithms()
SAME = [(alg, a, b) for alg, names in sorted(ALGORITHMS.items()) for a, b in itertools.combinations(names, 2)]
OTHER = [(a, b) for a, b in itertools.combinations(sorted(n for names in ALGORITHMS.values() for n in names), 2)
         if registry.get_spec(a).family == registry.get_spec(b).family
         and registry.get_spec(a).algorithm != registry.get_spec(b).algorithm]
_rng = random.Random(17)
GRIDS = [(14, 14), (_rng.randint(1, 20), _rng.randint(1, 20))]  # a fixed and a random grid


def test_algorithm_pairs_cover_the_registry():
    """Every algorithm with more than one implementation is compared, pair by pair, and the known
    groups are there (an implementation moved to its own algorithm would silently lose its check)."""
    assert _builtin_algorithms() == ALGORITHMS  # nothing registered since collection changed the groups
    shared = {alg: names for alg, names in ALGORITHMS.items() if len(names) > 1}
    assert {alg for alg, _, _ in SAME} == set(shared)
    assert len(SAME) == sum(math.comb(len(names), 2) for names in ALGORITHMS.values())
    assert len(SAME) == len(set(SAME))
    for alg, names in {"mha": {"mha.sdpa", "mha.math"}, "swin.shift": {"swin.shift_pad", "swin.shift_cyclic"},
                       "local": {"local.im2col", "local.shift_dwconv"}}.items():
        assert names <= set(shared.get(alg, ())), alg
    assert len(SAME) >= 3 and len(OTHER) >= 3
    assert set(itertools.chain(*OTHER)) >= {"sra.conv", "swin.window", "local.slide"}


@pytest.mark.parametrize("algorithm,a,b", SAME, ids=[f"{a}={b}" for _, a, b in SAME])
@pytest.mark.parametrize("h,w", GRIDS)
def test_same_algorithm_same_layout_same_function(algorithm, a, b, h, w):
    """Implementations of one algorithm load each other's state_dict strictly and agree (float64)."""
    ma = randomize_(attnbench.create(a, dim=48, heads=3), seed=5).eval()
    mb = attnbench.create(b, dim=48, heads=3).eval()
    mb.load_state_dict(ma.state_dict(), strict=True)
    x = torch.randn(2, h, w, 48, generator=torch.Generator().manual_seed(h * w))
    assert_same_function(ma, mb, x)


@pytest.mark.parametrize("a,b", OTHER, ids=[f"{a}!={b}" for a, b in OTHER])
def test_other_algorithms_of_a_family_differ(a, b):
    """Two algorithms of one family either have different layouts or compute different functions, so
    their algorithm labels are not hiding a pair that should be compared."""
    ma = randomize_(attnbench.create(a, dim=48, heads=3), seed=5).eval()
    mb = attnbench.create(b, dim=48, heads=3).eval()
    try:
        mb.load_state_dict(ma.state_dict(), strict=True)
    except RuntimeError:
        return  # different layouts
    x = torch.randn(2, 14, 14, 48, generator=torch.Generator().manual_seed(0))
    with pytest.raises(AssertionError, match="differ in float64"):
        assert_same_function(ma, mb, x)


def test_register_rejects_bad_classes():
    with pytest.raises(attnbench.RegistryError):
        attnbench.register("nodot")
    with pytest.raises(attnbench.RegistryError, match="needs a default"):
        @attnbench.register("bad.nodefault")
        class Bad(torch.nn.Module):
            def __init__(self, dim, heads, size):
                super().__init__()
    with pytest.raises(attnbench.RegistryError, match="registered twice"):
        @attnbench.register("mha.sdpa")
        class Clash(torch.nn.Module):
            def __init__(self, dim, heads):
                super().__init__()


def test_plugin_file_registers_and_counts():
    added = attnbench.load_plugin_file(ROOT / "examples" / "my_attention.py")
    assert added == ["mine.talking_heads"]
    assert "mine.talking_heads" in attnbench.list_impls()
    attnbench.load_plugin_file(ROOT / "examples" / "my_attention.py")  # loading twice is harmless
    build = lambda: attnbench.create("mine.talking_heads", dim=32, heads=4)  # noqa: E731
    c = F.count_flops(build, (2, 6, 6, 32), torch.float32)
    assert c["flops_torch"] == build().flops_analytic(2, 6, 6)
    assert build()(torch.randn(2, 6, 6, 32)).shape == (2, 6, 6, 32)


def test_plugin_errors_are_typed(tmp_path):
    with pytest.raises(attnbench.PluginError, match="does not exist"):
        attnbench.load_plugin_file(tmp_path / "missing.py")
    bad = tmp_path / "bad.py"
    bad.write_text("import nonexistent_module_xyz\n")
    with pytest.raises(attnbench.PluginError, match="failed to import"):
        attnbench.load_plugin_file(bad)


def test_entry_point_plugin(tmp_path):
    """An installed package's `attnbench.impls` entry point is imported and its names listed."""
    pkg = tmp_path / "site"
    (pkg / "epattn").mkdir(parents=True)
    (pkg / "epattn" / "__init__.py").write_text(textwrap.dedent('''
        import torch
        import attnbench

        @attnbench.register("ep.proj")
        class EpProj(torch.nn.Module):
            """Registered through an entry point."""
            def __init__(self, dim, heads, width: int = 2):
                super().__init__()
                self.lin = torch.nn.Linear(dim, dim)
            def forward(self, x):
                return self.lin(x)
    '''))
    dist = pkg / "epattn-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: epattn\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[attnbench.impls]\nepattn = epattn\n")
    code = "import attnbench; print(attnbench.list_impls('ep.*')); print(attnbench.get_spec('ep.proj').params)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"PYTHONPATH": f"{pkg}:{ROOT}", "PATH": "/usr/bin:/bin"}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "['ep.proj']" in out.stdout and "{'width': 2}" in out.stdout
