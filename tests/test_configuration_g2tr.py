import pytest

from g2tr_hf import G2TRConfig


def test_defaults_and_round_trip(tmp_path):
    config = G2TRConfig()
    assert (config.g2tr_ratio, config.g2tr_min_keep, config.g2tr_method) == (1.0, 32, "g2tr")
    assert (config.g2tr_latent_pool, config.g2tr_merge, config.g2tr_merge_scaling) == (2, True, 1.0)
    assert config.g2tr_cell_mapping == "corner"
    G2TRConfig(g2tr_ratio=0.5, g2tr_method="topk").save_pretrained(tmp_path)
    loaded = G2TRConfig.from_pretrained(tmp_path)
    assert loaded.g2tr_ratio == 0.5 and loaded.g2tr_method == "topk"


def test_loading_kwarg_reaches_the_config(tmp_path):
    G2TRConfig().save_pretrained(tmp_path)
    config, unused = G2TRConfig.from_pretrained(tmp_path, g2tr_ratio=0.5, return_unused_kwargs=True)
    assert config.g2tr_ratio == 0.5 and unused == {}


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"g2tr_ratio": 0.0}, "g2tr_ratio"),
        ({"g2tr_ratio": 2}, "g2tr_ratio"),
        ({"g2tr_min_keep": 0}, "g2tr_min_keep"),
        ({"g2tr_method": "nope"}, "g2tr_method"),
        ({"g2tr_latent_pool": 0}, "g2tr_latent_pool"),
        ({"g2tr_merge_scaling": -1.0}, "g2tr_merge_scaling"),
        ({"g2tr_cell_mapping": "area"}, "g2tr_cell_mapping"),
    ],
)
def test_bad_values_name_the_field(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        G2TRConfig(**kwargs)


def test_override_after_construction_is_caught_by_validate():
    config = G2TRConfig()
    config.g2tr_ratio = 1.5  # what a from_pretrained kwarg does: assigned after __post_init__
    with pytest.raises(ValueError, match="`g2tr_ratio`"):
        config.validate_g2tr()


def test_resolve_ratio_and_reduction_kwargs():
    config = G2TRConfig(g2tr_ratio=0.5, g2tr_min_keep=4, g2tr_method="topk", g2tr_merge=False)
    assert config.resolve_g2tr_ratio() == 0.5
    assert config.resolve_g2tr_ratio(0.25) == 0.25
    with pytest.raises(ValueError, match="`g2tr_ratio`"):
        config.resolve_g2tr_ratio(0.0)
    assert config.g2tr_reduction_kwargs() == {
        "min_keep": 4, "method": "topk", "merge": False, "merge_scaling": 1.0, "cell_mapping": "corner"
    }


def test_none_means_the_configs_value_everywhere(tmp_path):
    from g2tr_hf import G2TRBagelConfig

    built = G2TRBagelConfig(g2tr_ratio=None, g2tr_min_keep=None)
    assert (built.g2tr_ratio, built.g2tr_min_keep) == (1.0, 32)  # the defaults
    G2TRBagelConfig(g2tr_ratio=0.5).save_pretrained(tmp_path)
    assert G2TRBagelConfig.from_pretrained(tmp_path, g2tr_ratio=None).g2tr_ratio == 0.5  # the stored value
    assert G2TRBagelConfig.from_pretrained(tmp_path, g2tr_ratio=0.25).g2tr_ratio == 0.25
    assert G2TRBagelConfig.from_pretrained(tmp_path).resolve_g2tr_ratio(None) == 0.5  # and per call


def test_min_keep_that_disables_the_reduction_warns_once(caplog):
    import logging

    from g2tr_hf.reduction import reduces_anything

    with caplog.at_level(logging.WARNING, logger="g2tr_hf.reduction"):
        assert not reduces_anything(17, 0.5, min_keep=32)
        assert not reduces_anything(17, 0.5, min_keep=32)
        assert reduces_anything(17, 0.5, min_keep=4)
        assert not reduces_anything(17, 1.0, min_keep=32)  # nothing was asked: no warning
    warnings = [record for record in caplog.records if "min_keep" in record.getMessage()]
    assert len(warnings) == 1 and "17 tokens" in warnings[0].getMessage()
