import pytest

from srpo_megatron.algorithms.config import AlgorithmConfig


def test_defaults_are_the_paper_values_and_valid():
    cfg = AlgorithmConfig()
    cfg.validate()
    assert (cfg.variant, cfg.clip_low, cfg.clip_high, cfg.dual_clip, cfg.tis_cap) == (
        "srpo",
        0.2,
        0.28,
        3.0,
        2.0,
    )
    assert (cfg.topk, cfg.jsd_alpha, cfg.distill_is_cap, cfg.entropy_beta, cfg.ema_decay) == (
        100,
        0.5,
        2.0,
        1.0,
        0.05,
    )
    assert cfg.mix_lambda == 0.9 and not cfg.adv_std_norm and cfg.sibling == "first"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("variant", "ppo", "variant"),
        ("sibling", "last", "sibling"),
        ("jsd_alpha", 1.5, "jsd_alpha"),
        ("dual_clip", 1.0, "dual_clip"),
        ("clip_low", 1.0, "clip_low"),
        ("tis_cap", 0.0, "tis_cap"),
        ("topk", 0, "topk"),
        ("entropy_beta", -1.0, "entropy_beta"),
        ("ema_decay", 0.0, "ema_decay"),
        ("mix_lambda", -0.1, "mix_lambda"),
    ],
)
def test_validate_names_the_bad_field(field, value, message):
    cfg = AlgorithmConfig(**{field: value})
    with pytest.raises(ValueError, match=message):
        cfg.validate()


def test_variant_properties():
    assert AlgorithmConfig(variant="srpo").uses_dynamic_weighting
    assert not AlgorithmConfig(variant="srpo_no_dw").uses_dynamic_weighting
    assert not AlgorithmConfig(variant="sdpo").uses_dynamic_weighting
    assert not AlgorithmConfig(variant="grpo").uses_teacher
