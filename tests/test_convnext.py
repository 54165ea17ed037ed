"""The ConvNeXt family: sizes and compute as in the paper, API and layouts."""

import platform
from pathlib import Path

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from models import build_model, cpu, list_models

# Parameter counts (M) and GMACs at 224 from the paper (Table 2.1 / 3.3).
PAPER_PARAMS = {
    "convnext_tiny": 28.59,
    "convnext_small": 50.22,
    "convnext_base": 88.59,
    "convnext_large": 197.77,
    "convnext_xlarge": 350.20,
    "convnext_iso_small": 22.31,
    "convnext_iso_base": 87.08,
    "convnext_iso_large": 305.91,
}
# The small CPU variants are timm's definitions, here rounded to 0.1M.
SMALL_VARIANTS = {
    "convnext_atto": 3.7,
    "convnext_femto": 5.2,
    "convnext_pico": 9.1,
    "convnext_nano": 15.6,
}
PAPER_GMACS = {
    "convnext_tiny": 4.47,
    "convnext_small": 8.68,
    "convnext_base": 15.35,
    "convnext_iso_small": 4.29,
}


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_every_design_name_is_registered():
    assert set(PAPER_PARAMS) | set(SMALL_VARIANTS) <= set(list_models("classify"))


@pytest.mark.parametrize("arch", list(PAPER_PARAMS))
def test_param_count_matches_paper(arch):
    with torch.device("meta"):
        model = build_model(arch)
    got = n_params(model) / 1e6
    assert abs(got - PAPER_PARAMS[arch]) / PAPER_PARAMS[arch] <= 1e-3, got


@pytest.mark.parametrize("arch", list(SMALL_VARIANTS))
def test_small_variants_match_timm_exactly(arch):
    with torch.device("meta"):
        ours, theirs = build_model(arch), timm.create_model(arch)
    assert n_params(ours) == n_params(theirs)
    # The 0.1M rounding: atto and nano round to it; pico is 9.05M (timm's figure too).
    assert abs(n_params(ours) / 1e6 - SMALL_VARIANTS[arch]) <= 0.06


@pytest.mark.parametrize("arch", list(PAPER_GMACS))
def test_gmacs_match_paper(arch):
    with torch.device("meta"):
        model = build_model(arch)
        x = torch.empty(1, 3, 224, 224)
    counter = FlopCounterMode(display=False)
    with counter:
        model(x)
    gmacs = counter.get_total_flops() / 2 / 1e9
    assert abs(gmacs - PAPER_GMACS[arch]) / PAPER_GMACS[arch] <= 0.01, gmacs


def test_unknown_arch_names_the_known_ones():
    with pytest.raises(ValueError, match="convnext_tiny"):
        build_model("convnext_huge")


@pytest.mark.parametrize("arch", ["convnext_atto", "convnext_iso_small"])
def test_channels_last_gives_the_same_logits(arch):
    model = build_model(arch, num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.contiguous(memory_format=torch.channels_last))
    assert out.shape == (2, 10)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_timm_style_feature_and_head_api():
    model = build_model("convnext_atto", num_classes=7).eval()
    x = torch.randn(1, 3, 64, 64)
    feats = model.forward_features(x)
    assert feats.shape == (1, 320, 2, 2)
    assert model.forward_head(feats, pre_logits=True).shape == (1, 320)
    torch.testing.assert_close(model.forward_head(feats), model(x))
    model.reset_classifier(3, head_init_scale=0.001)
    assert model(x).shape == (1, 3)
    assert 0.015e-3 < model.head.weight.std() < 0.025e-3  # std .02, times 0.001


def test_features_only_gives_four_normed_stages():
    model = build_model("convnext_atto", features_only=True).eval()
    assert not hasattr(model, "head")
    outs = model(torch.randn(1, 3, 128, 96))
    assert [o.shape[1] for o in outs] == model.out_channels == [40, 80, 160, 320]
    assert [(o.shape[2], o.shape[3]) for o in outs] == [(32, 24), (16, 12), (8, 6), (4, 3)]
    assert {"norm0.weight", "norm3.bias"} <= set(model.state_dict())
    for o in outs:  # each output passes its own LayerNorm: ~zero mean over channels
        assert o.mean(1).abs().max() < 1e-4


def test_layer_scale_and_init_follow_the_paper():
    model = build_model("convnext_tiny", drop_path_rate=0.1, head_init_scale=0.5)
    blocks = [b for stage in model.stages for b in stage]
    assert all(torch.all(b.gamma == 1e-6) for b in blocks)
    # stochastic depth rates rise linearly from 0 over all 18 blocks
    rates = [b.drop_path.p if b.drop_path is not None else 0.0 for b in blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.1)
    assert rates == sorted(rates)
    w = model.stages[0][0].pwconv1.weight
    assert 0.019 < w.std() < 0.021  # truncated normal, std .02, as upstream
    assert 0.009 < model.head.weight.std() < 0.011  # scaled by head_init_scale 0.5
    assert torch.all(model.head.bias == 0)


def test_isotropic_layer_scale_defaults():
    assert build_model("convnext_iso_small").blocks[0].gamma is None
    with torch.device("meta"):
        assert build_model("convnext_iso_large").blocks[0].gamma is not None


def test_drop_path_is_active_only_in_training():
    model = build_model("convnext_atto", num_classes=5, drop_path_rate=0.5)
    x = torch.randn(4, 3, 64, 64)
    model.train()
    a, b = model(x), model(x)
    assert not torch.allclose(a, b)
    model.eval()
    torch.testing.assert_close(model(x), model(x))
    a.sum().backward()  # the training path is differentiable
    assert model.stages[0][0].gamma.grad is not None


def fused_flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    """The FLOPs one forward spends in oneDNN's fused linear op (FlopCounterMode sees it)."""
    counter = FlopCounterMode(display=False)
    with counter:
        model(x)
    return sum(
        n for op, n in counter.get_flop_counts()["Global"].items() if "_linear_pointwise" in str(op)
    )


def expected_native_bf16() -> bool | None:
    """From the CPU's own flags, independently of torch: oneDNN's bf16 ISAs. None off Linux."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    line = next(ln for ln in text.splitlines() if ln.startswith("flags"))
    flags = set(line.split(":", 1)[1].split())
    avx512_core = {"avx512bw", "avx512vl", "avx512dq"} <= flags
    return avx512_core or bool({"avx_ne_convert", "amx_bf16"} & flags)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 expectations")
def test_the_fast_path_is_decided_by_what_the_cpu_has():
    """The fused kernel must run in fp32 on every x86-64 CPU (else a torch upgrade silently lost
    it) and in bf16 exactly where the CPU has oneDNN's bf16 ISAs; the trial call is real."""
    native = expected_native_bf16()
    if native is None:
        pytest.skip("no /proc/cpuinfo")
    assert cpu.fused_linear_works(torch.float32), cpu.fast_path_summary()
    assert cpu.has_native_bf16() == native, cpu.fast_path_summary()
    assert cpu.fused_linear_works(torch.bfloat16) == native
    # the trial itself, without the capability check: on an AVX2-only CPU oneDNN raises in
    # bf16 and the trial says no instead of failing
    assert cpu._trial(torch.bfloat16) == native
    assert not cpu.fused_linear_works(torch.float16)  # never tried: no such fused path
    assert (cpu.bf16_unsupported_reason() is None) == native


@pytest.mark.parametrize("autocast", [False, True])
def test_cpu_inference_fast_path_matches_the_plain_modules(autocast):
    """Under inference_mode the block MLP runs fused in oneDNN where it works on this CPU (and
    plain where not); autograd mode, and the switch turned off, run nn.Linear."""
    from .conftest import perturb_, rel_max_diff

    model = perturb_(build_model("convnext_atto", num_classes=10)).eval()
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    dtype = torch.bfloat16 if autocast else torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        plain = model(x).float()  # grad enabled: the plain nn.Linear + nn.GELU path
        assert fused_flops(model, x) == 0
        with torch.inference_mode():
            fused = model(x).float()
            # each block's two MLP linears, 2 FLOPs a MAC: 2 x 2 x pixels x dim x 4 dim
            pixels = [2 * (64 // (4 * 2**i)) ** 2 for i in range(4)]
            mlp = sum(
                n * 16 * d * d * p for n, d, p in zip(model.depths, model.dims, pixels, strict=True)
            )
            expected = mlp if cpu.fused_linear_works(dtype) else 0
            assert fused_flops(model, x) == expected
            cpu.set_fused_linear(False)
            try:
                assert fused_flops(model, x) == 0
                off = model(x).float()
            finally:
                cpu.set_fused_linear(True)
    tolerance = 2e-2 if autocast else 1e-5
    assert rel_max_diff(fused, plain) <= tolerance
    assert rel_max_diff(off, plain) <= tolerance


def test_flop_counter_sees_the_fused_kernel():
    """Profiling under no_grad counts the fused MLP as the addmm it replaces (4.47 GMACs)."""
    model = build_model("convnext_tiny").eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        counter = FlopCounterMode(display=False)
        with counter:
            model(x)
    gmacs = counter.get_total_flops() / 2 / 1e9
    assert abs(gmacs - PAPER_GMACS["convnext_tiny"]) / PAPER_GMACS["convnext_tiny"] <= 0.01
