"""Model soups of LoRA adapters: exact weight averages, checks on the members, greedy choice."""
import json

import numpy as np
import pytest

from deelm.adapters.lora import LoraConfig, LoraLayout
from deelm.adapters.peft import DEELM_CONFIG_FILE, WEIGHTS_FILE, load_adapter, save_adapter
from deelm.adapters.soup import greedy_soup, soup_adapters
from deelm.errors import AdapterError

# A tiny LLaMA shape with interleaved-RoPE q/k rows (GGUF order inside deelm)
TINY = dict(n_layers=3, dim=32, hidden_dim=48, n_heads=4, n_kv_heads=2, head_dim=8, rope_style=0)
SETTINGS = {"bidirectional_from": 1, "pooling": "mean", "prompt": None,
            "base_model_fingerprint": "f" * 64, "base_model": "tiny.gguf"}


def make_adapter(path, config=None, seed=0, settings=SETTINGS, scale=0.1, model_cfg=TINY):
    config = config or LoraConfig(r=4, alpha=8)
    layout = LoraLayout(config, model_cfg)
    params = (scale * np.random.default_rng(seed).standard_normal(layout.size)).astype(np.float32)
    save_adapter(path, layout, params)
    if settings is not None:
        (path / DEELM_CONFIG_FILE).write_text(json.dumps({**settings,
                                                          "training": {"seed": seed, "lr": 0.1},
                                                          "dev_score": 50.0 + seed}))
    return path


def deltas(path, model_cfg=TINY):
    """{(layer, module id): scale * B @ A} of an adapter as deelm applies it."""
    _, layout, params = load_adapter(path, model_cfg)
    return {(int(t[0]), int(t[1])): layout.scales[i] * layout.lora_B(params, i) @
            layout.lora_A(params, i) for i, t in enumerate(layout.table)}


def assert_average(soup, members, weights, model_cfg=TINY):
    got, parts = deltas(soup, model_cfg), [deltas(m, model_cfg) for m in members]
    assert set(got) == set(parts[0])
    worst = max(float(np.abs(got[k] - sum(w * p[k] for w, p in zip(weights, parts))).max())
                for k in got)
    print(f"max |soup delta - weighted average of deltas| = {worst:.2e}")
    assert worst < 1e-6


def test_a_soup_is_the_exact_average_of_the_merged_updates(tmp_path):
    members = [make_adapter(tmp_path / f"s{i}", seed=i) for i in range(3)]
    out = soup_adapters(members, tmp_path / "soup")
    assert_average(out, members, [1 / 3] * 3)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 12 and cfg["lora_alpha"] == 12 and not cfg["rank_pattern"]
    settings = json.loads((out / DEELM_CONFIG_FILE).read_text())
    assert {k: settings[k] for k in SETTINGS} == SETTINGS
    assert settings["soup_method"] == "uniform"
    assert [m["seed"] for m in settings["soup"]] == [0, 1, 2]
    assert [m["dev_score"] for m in settings["soup"]] == [50.0, 51.0, 52.0]
    assert settings["training"] == {"lr": 0.1}  # what the members share, not their seeds


def test_weights_are_normalised_and_a_soup_of_one_is_the_adapter(tmp_path):
    a, b = make_adapter(tmp_path / "a", seed=0), make_adapter(tmp_path / "b", seed=1)
    assert_average(soup_adapters([a, b], tmp_path / "w", weights=[3, 1]), [a, b], [0.75, 0.25])
    assert_average(soup_adapters([a], tmp_path / "one"), [a], [1.0])
    assert_average(soup_adapters([a, b], tmp_path / "zero", weights=[0, 2]), [b], [1.0])


def test_members_of_other_ranks_scales_and_rslora(tmp_path):
    a = make_adapter(tmp_path / "a", LoraConfig(r=4, alpha=8), seed=0)
    b = make_adapter(tmp_path / "b", LoraConfig(r=2, alpha=3, use_rslora=True,
                                                rank_pattern={"q_proj": 3},
                                                alpha_pattern={"down_proj": 5}), seed=1)
    out = soup_adapters([a, b], tmp_path / "soup")
    assert_average(out, [a, b], [0.5, 0.5])
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 6 and not cfg["use_rslora"]
    assert sorted(set(cfg["rank_pattern"].values())) == [7]  # q_proj: 4 + 3


def test_float16_soups_halve_the_file(tmp_path):
    members = [make_adapter(tmp_path / f"s{i}", seed=i) for i in range(2)]
    f32 = soup_adapters(members, tmp_path / "f32")
    f16 = soup_adapters(members, tmp_path / "f16", dtype="float16")
    assert (f16 / WEIGHTS_FILE).stat().st_size < 0.6 * (f32 / WEIGHTS_FILE).stat().st_size
    d32, d16 = deltas(f32), deltas(f16)
    assert max(float(np.abs(d32[k] - d16[k]).max()) for k in d32) < 1e-3
    huge = make_adapter(tmp_path / "huge", seed=3, scale=1e5)
    with pytest.raises(ValueError, match="beyond float16's range"):
        soup_adapters([huge], tmp_path / "h16", dtype="float16")
    assert not (tmp_path / "h16").exists()
    assert_average(soup_adapters([huge], tmp_path / "h32"), [huge], [1.0])


def test_rank_compression_is_the_truncated_svd_of_the_average(tmp_path):
    members = [make_adapter(tmp_path / f"s{i}", seed=i) for i in range(3)]
    full = deltas(soup_adapters(members, tmp_path / "full"))
    # rank >= the update's rank: exact
    assert_average(soup_adapters(members, tmp_path / "r12", rank=12), members, [1 / 3] * 3)
    assert_average(soup_adapters(members[:1], tmp_path / "r4", rank=4), members[:1], [1.0])
    out = soup_adapters(members, tmp_path / "r5", rank=5)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 5 and cfg["lora_alpha"] == 5
    settings = json.loads((out / DEELM_CONFIG_FILE).read_text())
    assert settings["soup_rank"] == 5
    got, least = deltas(out), 1.0
    for key, d in full.items():
        u, s, vt = np.linalg.svd(d.astype(np.float64))
        best = (u[:, :5] * s[:5]) @ vt[:5]  # Eckart-Young: the best rank-5 approximation
        assert np.abs(got[key] - best).max() < 1e-5
        least = min(least, float(np.sum(s[:5] ** 2) / np.sum(s ** 2)))
    assert settings["soup_least_norm_kept"] == pytest.approx(least, rel=1e-6)
    for bad in (0, -1, 2.5, True, "8"):
        with pytest.raises(ValueError, match="rank must be a positive integer"):
            soup_adapters(members, tmp_path / "bad", rank=bad)


def test_members_must_embed_alike_and_fit_together(tmp_path):
    a = make_adapter(tmp_path / "a")
    for name, change in (("pooling", "last"), ("bidirectional_from", 2), ("prompt", "x {text}"),
                         ("base_model_fingerprint", "0" * 64)):
        other = make_adapter(tmp_path / name, settings={**SETTINGS, name: change})
        with pytest.raises(AdapterError, match=f"{name} is .* a soup's members must share"):
            soup_adapters([a, other], tmp_path / "out")
    fewer = make_adapter(tmp_path / "fewer", LoraConfig(r=4, target_modules=("q_proj",)))
    with pytest.raises(AdapterError, match="other layers or modules"):
        soup_adapters([a, fewer], tmp_path / "out")
    wider = make_adapter(tmp_path / "wider", model_cfg={**TINY, "hidden_dim": 64})
    with pytest.raises(AdapterError, match="not the same base model"):
        soup_adapters([a, wider], tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("adapters, weights, error, message", [
    ([], None, ValueError, "one or more adapter folders"),
    ("a", None, ValueError, "one or more adapter folders"),
    (["a", "b"], [1], ValueError, "weights must be 2 non-negative"),
    (["a", "b"], [1, -1], ValueError, "weights must be 2 non-negative"),
    (["a", "b"], [0, 0], ValueError, "weights must be 2 non-negative"),
    (["a", "b"], [1, float("nan")], ValueError, "weights must be 2 non-negative"),
    (["a", "missing"], None, AdapterError, "no such adapter directory"),
])
def test_bad_arguments(tmp_path, adapters, weights, error, message):
    make_adapter(tmp_path / "a")
    make_adapter(tmp_path / "b", seed=1)
    folders = tmp_path / adapters if isinstance(adapters, str) else [tmp_path / a for a in adapters]
    with pytest.raises(error, match=message):
        soup_adapters(folders, tmp_path / "out", weights=weights)
    with pytest.raises(ValueError, match="dtype"):
        soup_adapters([tmp_path / "a"], tmp_path / "out", dtype="int8")


def test_corrupt_members_are_adapter_errors(tmp_path):
    a, b = make_adapter(tmp_path / "a"), make_adapter(tmp_path / "b", seed=1)
    raw = (b / WEIGHTS_FILE).read_bytes()
    (b / WEIGHTS_FILE).write_bytes(raw[: len(raw) // 2])
    with pytest.raises(AdapterError, match="corrupt or truncated"):
        soup_adapters([a, b], tmp_path / "out")
    make_adapter(b, seed=1)
    (b / DEELM_CONFIG_FILE).write_text("{not json")
    with pytest.raises(AdapterError, match="not valid JSON"):
        soup_adapters([a, b], tmp_path / "out")


@pytest.fixture
def pairs_file(tmp_path):
    words = ["cat", "dog", "car", "tree", "sun", "rain", "bread", "music", "river", "stone"]
    rng = np.random.default_rng(0)
    path = tmp_path / "dev.jsonl"
    with open(path, "w") as fh:
        for i in range(24):
            a, b = rng.choice(words, 3), rng.choice(words, 3)
            fh.write(json.dumps({"sentence1": " ".join(a), "sentence2": " ".join(b),
                                 "score": float(len(set(a) & set(b)))}) + "\n")
    return path


def test_greedy_soup_keeps_what_helps_and_restores_the_model(tiny_path, tmp_path, pairs_file):
    from conftest import fresh_tiny
    from deelm.eval.sts import load_sts_file, score_pairs

    model = fresh_tiny(tiny_path, k=-1)
    settings = {**SETTINGS, "bidirectional_from": 1, "pooling": "mean"}
    members = [make_adapter(tmp_path / f"s{i}", seed=i, settings=settings, scale=0.3,
                            model_cfg=model.config) for i in range(3)]
    before = model.encode(["a cat in the rain"])
    result = greedy_soup(model, members, pairs_file, tmp_path / "greedy")
    # the model embeds as before: no adapter, its own attention and pooling
    assert model.adapter is None and model.bidirectional_from == -1
    np.testing.assert_array_equal(model.encode(["a cat in the rain"]), before)
    # the best single member comes first; the chosen soup scores what it says
    best = max(result.candidate_scores, key=result.candidate_scores.get)
    assert result.members[0] == best and result.tried[0] == ([best], result.candidate_scores[best])
    assert result.dev_score >= result.candidate_scores[best]
    data = load_sts_file(pairs_file)
    model.load_adapter(result.path)
    model.bidirectional_from = 1
    assert score_pairs(model, data) == pytest.approx(result.dev_score, abs=1e-9)
    saved = json.loads((result.path / DEELM_CONFIG_FILE).read_text())
    assert saved["soup_method"] == "greedy" and saved["dev_score"] == result.dev_score
    assert [m["adapter"] for m in saved["soup"]] == result.members
    # loading the soup by path restores the members' settings
    import deelm

    loaded = deelm.DeeLM.from_pretrained(tiny_path[0], adapter=result.path)
    assert loaded.bidirectional_from == 1 and loaded.pooling == "mean"
    assert score_pairs(loaded, data) == pytest.approx(result.dev_score, abs=1e-9)


def test_greedy_soup_restores_an_applied_adapter(tiny_path, tmp_path, pairs_file):
    from conftest import fresh_tiny

    model = fresh_tiny(tiny_path, k=2)
    own = make_adapter(tmp_path / "own", seed=7, model_cfg=model.config)
    model.load_adapter(own)
    before = model.encode(["stone river"])
    members = [make_adapter(tmp_path / f"s{i}", seed=i, model_cfg=model.config) for i in range(2)]
    greedy_soup(model, members, pairs_file, tmp_path / "greedy")
    assert model.adapter_path == own and model.bidirectional_from == 2
    np.testing.assert_array_equal(model.encode(["stone river"]), before)


def test_cli_uniform_and_greedy_soups(tiny_path, tmp_path, pairs_file, capsys):
    from deelm.__main__ import main
    from conftest import fresh_tiny

    cfg = fresh_tiny(tiny_path, k=-1).config
    members = [str(make_adapter(tmp_path / f"s{i}", seed=i, model_cfg=cfg)) for i in range(2)]
    assert main(["soup", *members, "--output", str(tmp_path / "u"), "--weights", "1", "3",
                 "--adapter-dtype", "float16"]) == 0
    assert "soup of 2 adapters" in capsys.readouterr().out
    saved = json.loads((tmp_path / "u" / DEELM_CONFIG_FILE).read_text())
    assert [m["weight"] for m in saved["soup"]] == [0.25, 0.75]
    assert main(["soup", *members, "--output", str(tmp_path / "g"), "--eval-data",
                 str(pairs_file), "--model", str(tiny_path[0]), "--threads", "1",
                 "--rank", "6"]) == 0
    out = capsys.readouterr()
    assert "greedy soup of" in out.out and "1 thread)" in out.out and "s0: " in out.err
    saved = json.loads((tmp_path / "g" / DEELM_CONFIG_FILE).read_text())
    assert saved["soup_rank"] == 6
    # errors: before any loading, or as one line
    with pytest.raises(SystemExit):
        main(["soup", members[0], str(tmp_path / "nothing"), "--output", str(tmp_path / "x")])
    assert "adapter folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["soup", *members, "--output", str(tmp_path / "x"), "--eval-data",
              str(tmp_path / "no.jsonl")])
    assert "evaluation data" in capsys.readouterr().err
    assert main(["soup", *members, "--output", str(tmp_path / "x"), "--weights", "1"]) == 1
    assert "weights must be 2" in capsys.readouterr().err
    assert main(["soup", *members, "--output", str(tmp_path / "x"), "--weights", "1", "1",
                 "--eval-data", str(pairs_file)]) == 1
    assert "exclude each other" in capsys.readouterr().err


def test_greedy_dev_score_is_the_written_files_even_for_one_member(tiny_path, tmp_path,
                                                                    pairs_file):
    from conftest import fresh_tiny
    from deelm.eval.sts import load_sts_file, score_pairs

    model = fresh_tiny(tiny_path, k=-1)
    lone = make_adapter(tmp_path / "lone", seed=4, scale=0.3, model_cfg=model.config)
    result = greedy_soup(model, [lone], pairs_file, tmp_path / "g", dtype="float16", rank=2)
    assert result.members == [str(lone)]
    model.load_adapter(result.path)
    model.bidirectional_from = SETTINGS["bidirectional_from"]
    written = score_pairs(model, load_sts_file(pairs_file))
    print(f"lone member {result.candidate_scores[str(lone)]:.4f}, written at rank 2 in float16 "
          f"{written:.4f}")
    assert written != result.candidate_scores[str(lone)]  # compression changed it
    assert result.dev_score == pytest.approx(written, abs=1e-9)
