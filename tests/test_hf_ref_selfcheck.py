"""Sanity tests of the HF reference helpers (tests/hf_ref.py) and the tiny fixtures they build."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

import hf_ref

S, F = hf_ref.S, hf_ref.F
ALL = hf_ref.VARIANTS


def _load(path):
    return safetensors_torch.load_file(str(path / "model.safetensors"))


def _text_prefix(variant):
    return "model." if variant == "text" else "model.language_model."


# ------------------------------------------------------------------------------------------------ patch


def test_patch_is_idempotent_and_assistant_constructible():
    hf_ref.patch_transformers()
    from transformers.models.gemma4.configuration_gemma4 import Gemma4TextConfig

    fget = Gemma4TextConfig.__dict__["kv_sharing_modes"].fget
    hf_ref.patch_transformers()
    assert Gemma4TextConfig.__dict__["kv_sharing_modes"].fget is fget  # no double wrapping
    assert hf_ref.is_patched()

    for variant in ("e2b", "26b", "12b"):
        cfg = hf_ref.make_assistant_config(variant)
        tc = cfg.get_text_config()
        assert list(tc.kv_sharing_modes) == ["reuse"] * tc.num_hidden_layers
        if variant == "12b":
            model = transformers.Gemma4UnifiedAssistantForCausalLM(cfg)
        else:
            model = transformers.Gemma4AssistantForCausalLM(cfg)
        names = [n for n, _ in model.named_parameters()]
        assert not any(".k_proj." in n or ".v_proj." in n or ".k_norm." in n for n in names)
        assert any(n.endswith("pre_projection.weight") for n in names)


@pytest.mark.skipif(
    transformers.__version__ != "5.23.0", reason="documents the transformers 5.23.0 bug"
)
def test_unpatched_property_is_broken_in_5_23():
    tc = hf_ref.make_assistant_config("e2b").get_text_config()
    original = type(tc).__dict__["kv_sharing_modes"].fget.__wrapped__
    with pytest.raises(ValueError, match="producing a cache"):
        original(tc)
    tc26 = hf_ref.make_target_config("26b").get_text_config()
    assert original(tc26) == [None] * tc26.num_hidden_layers


@pytest.mark.parametrize("variant", ALL)
def test_target_kv_sharing_modes(variant):
    tc = hf_ref.make_target_config(variant).get_text_config()
    spec = hf_ref.TARGET_TEXT_CONFIGS[variant]
    prod = hf_ref.producers(spec)
    n = spec["num_hidden_layers"]
    first_shared = n - spec["num_kv_shared_layers"]
    expected = [None] * n
    for i in range(first_shared, n):
        expected[i] = "reuse"
    for i in prod.values():
        expected[i] = "store"
    assert list(tc.kv_sharing_modes) == expected
    if spec["num_kv_shared_layers"]:  # unchanged vs the original property where it works
        assert type(tc).__dict__["kv_sharing_modes"].fget.__wrapped__(tc) == expected
        # at least one consumer of each type (E-models)
        assert {spec["layer_types"][i] for i in range(first_shared, n)} == {S, F}


# ------------------------------------------------------------------------------------------------ layout


@pytest.mark.parametrize("variant", ALL)
def test_checkpoint_layout(variant, hf_target):
    path = hf_target(variant)
    sd = _load(path)
    spec = hf_ref.TARGET_TEXT_CONFIGS[variant]
    pre = _text_prefix(variant)
    keys = list(sd)
    assert all(v.dtype == torch.float32 for v in sd.values())
    assert "lm_head.weight" not in sd  # tied
    assert f"{pre}embed_tokens.weight" in sd and f"{pre}norm.weight" in sd
    if variant == "text":
        assert all(k.startswith("model.") and "language_model" not in k for k in keys)
    else:
        text_keys = [k for k in keys if k.startswith("model.language_model.")]
        other = [k for k in keys if not k.startswith("model.language_model.")]
        assert len(text_keys) > 0 and len(other) > 0
        if variant == "12b":  # Google's 12B layout: encoder-free vision embedder
            assert any(k.startswith("model.vision_embedder.") for k in other)
            assert "model.embed_vision.embedding_projection.weight" in other
        else:
            assert any(k.startswith("model.vision_tower.") for k in other)
            assert "model.embed_vision.embedding_projection.weight" in other
        assert any(k.startswith("model.embed_audio.") for k in other) == hf_ref.HAS_AUDIO[variant]
        assert any(k.startswith("model.audio_tower.") for k in other) == (
            hf_ref.HAS_AUDIO[variant] and variant != "12b"
        )
    geo = hf_ref.kv_geometry(spec)
    n = spec["num_hidden_layers"]
    first_shared = n - spec["num_kv_shared_layers"]
    H = spec["hidden_size"]
    for i, t in enumerate(spec["layer_types"]):
        nkv, hd = geo[t]
        lp = f"{pre}layers.{i}."
        assert sd[lp + "self_attn.q_proj.weight"].shape == (spec["num_attention_heads"] * hd, H)
        assert sd[lp + "layer_scalar"].shape == (1,)
        if i >= first_shared:
            assert (
                lp + "self_attn.k_proj.weight" not in sd
                and lp + "self_attn.k_norm.weight" not in sd
            )
        else:
            assert sd[lp + "self_attn.k_proj.weight"].shape == (nkv * hd, H)
            has_v = not (spec["attention_k_eq_v"] and t == F)
            assert (lp + "self_attn.v_proj.weight" in sd) == has_v
        inter = spec["intermediate_size"] * (
            2 if spec.get("use_double_wide_mlp") and i >= first_shared else 1
        )
        assert sd[lp + "mlp.gate_proj.weight"].shape == (inter, H)
        if spec.get("enable_moe_block"):
            E, im = spec["num_experts"], spec["moe_intermediate_size"]
            assert sd[lp + "experts.gate_up_proj"].shape == (E, 2 * im, H)
            assert sd[lp + "experts.down_proj"].shape == (E, H, im)
            assert sd[lp + "router.per_expert_scale"].shape == (E,)
        if spec.get("hidden_size_per_layer_input"):
            assert sd[lp + "per_layer_input_gate.weight"].shape == (
                spec["hidden_size_per_layer_input"],
                H,
            )
    if spec.get("hidden_size_per_layer_input"):
        P = spec["hidden_size_per_layer_input"]
        assert sd[f"{pre}embed_tokens_per_layer.weight"].shape == (
            spec["vocab_size_per_layer_input"],
            n * P,
        )

    cfg = json.loads((path / "config.json").read_text())
    tc = cfg if variant == "text" else cfg["text_config"]
    assert "per_layer_config" not in tc and tc["global_head_dim"] == spec["global_head_dim"]
    assert tc["model_type"] == ("gemma4_unified_text" if variant == "12b" else "gemma4_text")
    assert (path / "tokenizer.json").is_file()


@pytest.mark.parametrize("variant", ALL)
def test_checkpoint_values_perturbed(variant, hf_target, hf_assistant):
    for path, is_target in ((hf_target(variant), True), (hf_assistant(variant), False)):
        sd = _load(path)
        text = {k: v for k, v in sd.items() if not is_target or k.startswith(_text_prefix(variant))}
        norms = {k: v for k, v in text.items() if "norm" in k and k.endswith(".weight")}
        assert norms
        for k, v in norms.items():
            assert not torch.allclose(v, torch.ones_like(v)), k
            assert (v - 1).abs().mean() > 0.1, k
        scalars = torch.cat([v for k, v in text.items() if k.endswith("layer_scalar")])
        assert (
            len(scalars) == hf_ref.TARGET_TEXT_CONFIGS[variant]["num_hidden_layers"]
            or not is_target
        )
        assert ((scalars >= 0.5) & (scalars <= 1.5)).all() and scalars.std() > 0.05
        for k, v in text.items():
            if "router.scale" in k or "router.per_expert_scale" in k:
                assert (v - 1).abs().mean() > 0.05, k
        if is_target and hf_ref.TARGET_TEXT_CONFIGS[variant].get("enable_moe_block"):
            assert any("router.per_expert_scale" in k for k in text)
        if not is_target:
            outer = json.loads((path / "config.json").read_text())
            if outer["use_ordered_embeddings"]:
                order = sd["masked_embedding.token_ordering"]
                assert order.dtype == torch.int64
                assert sorted(order.tolist()) == list(range(outer["text_config"]["vocab_size"]))
                assert order.tolist() != sorted(order.tolist())
            else:
                assert not any(k.startswith("masked_embedding") for k in sd)


@pytest.mark.parametrize("variant", ALL)
def test_assistant_pairing(variant, hf_pair):
    tp, ap = hf_pair(variant)
    tcfg = json.loads((tp / "config.json").read_text())
    acfg = json.loads((ap / "config.json").read_text())
    ttc = tcfg.get("text_config", tcfg)
    atc = acfg["text_config"]
    assert acfg["backbone_hidden_size"] == ttc["hidden_size"]
    assert atc["vocab_size"] == ttc["vocab_size"] and atc["sliding_window"] == ttc["sliding_window"]
    assert hf_ref.kv_geometry(atc) == hf_ref.kv_geometry(ttc)
    assert set(atc["layer_types"]) == {S, F} and 2 <= atc["num_hidden_layers"] <= 4
    assert atc["num_kv_shared_layers"] == atc["num_hidden_layers"]
    assert acfg["model_type"] == (
        "gemma4_unified_assistant" if variant == "12b" else "gemma4_assistant"
    )
    assert acfg["use_ordered_embeddings"] == (variant in ("e2b", "e4b", "text"))
    gen = json.loads((ap / "generation_config.json").read_text())
    assert gen["num_assistant_tokens"] == 4
    sd = _load(ap)
    Hb, d = ttc["hidden_size"], atc["hidden_size"]
    assert sd["pre_projection.weight"].shape == (d, 2 * Hb)
    assert sd["post_projection.weight"].shape == (Hb, d)
    assert not any("k_proj" in k or "v_proj" in k or "lm_head" in k for k in sd)


# ------------------------------------------------------------------------------------------------ forward


@pytest.mark.parametrize("variant", ALL)
def test_target_forward_shapes_and_semantics(variant, hf_target):
    path = hf_target(variant)
    spec = hf_ref.TARGET_TEXT_CONFIGS[variant]
    ids = hf_ref.random_ids(44, spec["vocab_size"], seed=3)
    assert len(ids) > 2 * spec["sliding_window"]
    ref = hf_ref.hf_target_forward(path, ids)
    S_, V, H = len(ids), spec["vocab_size"], spec["hidden_size"]
    assert (
        ref["logits"].shape == (S_, V)
        and ref["hidden"].shape == (S_, H)
        and ref["embeds"].shape == (S_, H)
    )
    assert all(np.isfinite(a).all() for a in (ref["logits"], ref["hidden"]))
    # shared KV shapes per spec section 3: [1, nKV_t, S, hd_t] (prefill: all prompt positions)
    assert set(ref["shared_kv"]) == {S, F}
    for t, (nkv, hd) in hf_ref.kv_geometry(spec).items():
        K, Vv = ref["shared_kv"][t]
        assert K.shape == (1, nkv, S_, hd) and Vv.shape == (1, nkv, S_, hd)
        # V is v_norm'ed (RMS 1 without weight); K is k_norm'ed with a perturbed weight
        assert np.allclose(np.sqrt((Vv**2).mean(-1)), 1.0, atol=1e-3)
    # hidden is the post-final-norm state: logits = softcap(hidden @ E^T) with the raw tied table
    E = _load(path)[f"{_text_prefix(variant)}embed_tokens.weight"].numpy()
    cap = spec["final_logit_softcapping"]
    np.testing.assert_allclose(
        cap * np.tanh(ref["hidden"] @ E.T / cap), ref["logits"], atol=2e-5, rtol=0
    )
    # embeddings are the scaled ones (scale = bf16(sqrt(H)) cast to the weight dtype -> sqrt(H) in fp32)
    scale = ref["embeds"][0] / E[ids[0]]
    np.testing.assert_allclose(scale, np.float32(np.sqrt(H)), rtol=1e-2)
    # the soft-cap moves the logits by far more than the parity tolerance
    raw = ref["hidden"] @ E.T
    assert np.abs(raw - ref["logits"]).max() > 1e-3
    # causal: a prefix gives the same logits / shared K
    pre = hf_ref.hf_target_forward(path, ids[:20])
    np.testing.assert_allclose(pre["logits"], ref["logits"][:20], atol=1e-4, rtol=0)
    np.testing.assert_allclose(
        pre["shared_kv"][F][0], ref["shared_kv"][F][0][:, :, :20], atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("variant", ["e2b", "26b", "12b"])
def test_drafter_step(variant, hf_pair):
    tp, ap = hf_pair(variant)
    spec = hf_ref.ASSISTANT_TEXT_CONFIGS[variant]
    outer = hf_ref.ASSISTANT_OUTER_CONFIGS[variant]
    ids = hf_ref.random_ids(40, spec["vocab_size"], seed=4)
    r = hf_ref.hf_first_round(tp, ap, ids, 3)
    Hb = hf_ref.TARGET_TEXT_CONFIGS[variant]["hidden_size"]
    assert r["position"] == len(ids)
    for logits, post in zip(r["logits"], r["post_projection"]):
        assert logits.shape == (spec["vocab_size"],) and post.shape == (Hb,)
        if outer["use_ordered_embeddings"]:
            fill = logits.min()
            n_sel = (
                outer["centroid_intermediate_top_k"] * spec["vocab_size"] // outer["num_centroids"]
            )
            assert (logits > fill).sum() == n_sel
    # deterministic / cached
    l2, p2 = hf_ref.hf_drafter_step(ap, *r["inputs"][1], r["shared_kv"], r["position"])
    np.testing.assert_array_equal(l2, r["logits"][1])
    np.testing.assert_array_equal(p2, r["post_projection"][1])
    # the sliding layers only see the last W+1 entries: older sliding entries must not matter
    W = spec["sliding_window"]
    skv = dict(r["shared_kv"])
    K, Vv = skv[S]
    K2, V2 = K.copy(), Vv.copy()
    K2[:, :, : -(W + 1)] = 0.0
    V2[:, :, : -(W + 1)] = 0.0
    skv[S] = (K2, V2)
    l3, _ = hf_ref.hf_drafter_step(ap, *r["inputs"][0], skv, r["position"])
    np.testing.assert_allclose(l3, r["logits"][0], atol=1e-5, rtol=0)
    K3 = K.copy()
    K3[:, :, -(W + 1)] += 1.0
    skv[S] = (K3, Vv)
    l4, _ = hf_ref.hf_drafter_step(ap, *r["inputs"][0], skv, r["position"])
    assert np.abs(l4 - r["logits"][0]).max() > 1e-4


# ------------------------------------------------------------------------------------------------ generation


@pytest.mark.parametrize("variant", ["e2b", "26b"])
def test_assisted_greedy_equals_plain_greedy(variant, hf_pair):
    tp, ap = hf_pair(variant)
    spec = hf_ref.TARGET_TEXT_CONFIGS[variant]
    ids = hf_ref.random_ids(20, spec["vocab_size"], seed=5)
    n_new = 40
    assert len(ids) + n_new > 4 * spec["sliding_window"]
    plain = hf_ref.hf_greedy(tp, ids, n_new)
    res = hf_ref.hf_assisted_greedy(tp, ap, ids, n_new, k=3)
    assert len(plain) == n_new
    assert res["tokens"] == plain
    assert len(set(plain)) > 3  # not a degenerate loop
    # prefill (+ a final 1-token step when the budget leaves no room for drafts) + one verify per drafting round
    assert res["target_forwards"] == res["rounds"] + res["undrafted_forwards"]
    assert 1 <= res["undrafted_forwards"] <= 2
    assert len(res["tokens"]) == res["target_forwards"] + res["accepted"]
    assert all(1 <= d <= 3 for d, _ in res["per_round"]) and all(
        0 <= a <= d for d, a in res["per_round"]
    )
    assert res["drafted"] == sum(d for d, _ in res["per_round"])
    # the first round's drafts are exactly what hf_drafter_step produces (our drafter call == HF's)
    first = hf_ref.hf_first_round(tp, ap, ids, 3)
    assert first["bonus"] == plain[0]
    assert res["drafts"][0] == first["tokens"]


def test_shared_trained_pair_assisted_equals_greedy(shared_models):
    tp = shared_models / "tiny-gemma4-code"
    ap = shared_models / "tiny-gemma4-code-assistant"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tp))
    ids = tok("import os\nimport sys\n\n\ndef main(argv):\n    parser = argparse.ArgumentParser(")[
        "input_ids"
    ]
    plain = hf_ref.hf_greedy(tp, ids, 40)
    res = hf_ref.hf_assisted_greedy(tp, ap, ids, 40, k=4)
    assert res["tokens"] == plain
    assert res["accepted"] > 0 and res["tokens_per_target_forward"] > 1.5
    assert len(res["tokens"]) == res["target_forwards"] + res["accepted"]
