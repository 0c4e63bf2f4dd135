"""Per-layer selection among fitted rotations: chosen on the validation split only, merged per unit with each
unit's own view, and read back as the chosen candidates' rotations."""

import pytest
import torch

from tqlab.data.synthetic import SyntheticKV
from tqlab.fit.select import merge_per_layer, select_per_layer, validation_scores
from tqlab.kv import KVQuantSpec
from tqlab.rotation import make_rotation
from tqlab.rotation.io import load_rotations, save_rotations, unit_name

VIEWS = ("vector", "spinor_plus", "spinor_minus")


class ValidationOnly:
    """A KV source that refuses every split but validation."""

    def __init__(self, source):
        self.source, self.architecture, self.layers = source, source.architecture, source.layers
        self.manifest, self.seen = source.manifest, set()

    def layer_facts(self, layer):
        return self.source.layer_facts(layer)

    def num_sequences(self, split):
        return self.source.num_sequences(split)

    def load(self, split, *args):
        self.seen.add(split)
        assert split == "validation", f"the selector read the {split} split"
        return self.source.load(split, *args)


def candidates(tmp_path, source, **facts_update):
    paths = {}
    for i, view in enumerate(VIEWS):
        torch.manual_seed(i)
        rotations = {}
        for layer in source.layers:
            for head in range(2):
                rot = make_rotation("block_so8_learned", 16, view=view)
                for p in rot.parameters():
                    torch.nn.init.normal_(p, std=0.5)
                rotations[unit_name(layer, head)] = rot
        facts = {
            "rotation": "block_so8_learned", "rotation_options": {"view": view}, "dim": 16,
            "codec": "turboquant_mse", "bits": {"key": 2, "value": None}, "center": {"key": False},
            "model": None, "objective": "mse", "per_head": True,
        }  # fmt: skip
        facts.update(facts_update)
        paths[view] = tmp_path / view / "best.safetensors"
        save_rotations(paths[view], rotations, facts)
    return paths


def test_the_choice_reads_validation_only_and_the_merged_file_holds_each_layers_choice(tmp_path):
    source = SyntheticKV("outliers", num_layers=3, num_kv_heads=2, head_dim=16, seq_len=32)
    guarded = ValidationOnly(source)
    paths = candidates(tmp_path, source)
    choice, scores = select_per_layer(paths, guarded, calibration=None)
    assert guarded.seen == {"validation"}
    for layer, view in choice.items():
        assert scores[view][layer] == max(scores[v][layer] for v in VIEWS)
        assert all(0 < scores[v][layer] <= 1 for v in VIEWS)
    merged = merge_per_layer(choice, paths, tmp_path / "merged" / "best.safetensors")
    rotations, facts = load_rotations(merged)
    assert facts["selection"]["split"] == "validation" and facts["rotation_options"]["view"] == "per_layer"
    for unit, rot in rotations.items():
        layer = int(unit.split("_layer")[1].split("_")[0])
        original, _ = load_rotations(paths[choice[layer]])
        assert rot.view == choice[layer]
        torch.testing.assert_close(rot.matrix(), original[unit].matrix(), rtol=0, atol=0)
    spec = KVQuantSpec.create("turboquant_mse", 2, compress=("key",), fitted=merged)  # usable by eval.py
    assert spec.columns()["view"] == "per_layer"


class ScaledWindowed(ValidationOnly):
    """The same keys attended as a model with another softmax scale and a sliding window would."""

    def layer_facts(self, layer):
        return {"scaling": 0.7, "sliding_window": 5}


def test_candidates_are_scored_with_each_layers_scale_and_window(tmp_path):
    source = SyntheticKV("outliers", num_layers=2, num_kv_heads=2, head_dim=16, seq_len=32)
    path = candidates(tmp_path, source)["vector"]
    scaled = validation_scores(path, ScaledWindowed(source), calibration=None)
    assert scaled != validation_scores(path, ValidationOnly(source), calibration=None)
    # against PyTorch's own attention with that scale and mask, in float64
    from tqlab.kv.builder import CodecBank

    bank = CodecBank(KVQuantSpec.create("turboquant_mse", 2, compress=("key",), fitted=path), 16, None)
    for layer in source.layers:
        cosines = []
        for head in range(2):
            codec = bank.get("key", layer, head, "cpu")
            for s in range(source.num_sequences("validation")):
                block = source.load("validation", layer, s, head)
                q, k, v = (block[x].double() for x in "qkv")
                k_hat = codec.dequantize(codec.quantize(block["k"])).double()
                mask = torch.ones(32, 32, dtype=torch.bool).tril() & ~torch.ones(
                    32, 32, dtype=torch.bool
                ).tril(-5)
                sdpa = torch.nn.functional.scaled_dot_product_attention
                exact, approx = (sdpa(q, key, v, attn_mask=mask, scale=0.7) for key in (k, k_hat))
                cosines.append(torch.nn.functional.cosine_similarity(exact, approx, dim=-1).mean().item())
        assert scaled[layer] == pytest.approx(sum(cosines) / len(cosines), rel=1e-9)


def test_candidates_from_another_capture_other_layers_or_without_keys_are_refused(tmp_path):
    source = SyntheticKV("outliers", num_layers=2, num_kv_heads=2, head_dim=16, seq_len=32)
    other = candidates(tmp_path / "other", source, capture="f" * 64)["vector"]
    with pytest.raises(ValueError, match="fitted on capture ffffffffffffffff"):
        validation_scores(other, source, calibration=None)
    wider = candidates(tmp_path / "wider", SyntheticKV("outliers", num_layers=3, num_kv_heads=2, head_dim=16))
    facts = load_rotations(wider["vector"])[1]
    save_rotations(wider["vector"], load_rotations(wider["vector"])[0], {**facts, "layers": [0, 1, 2]})
    with pytest.raises(ValueError, match=r"fitted on layers \[2\] that this source does not hold"):
        validation_scores(wider["vector"], source, calibration=None)
    values = candidates(tmp_path / "values", source, bits={"key": None, "value": 2})["vector"]
    with pytest.raises(ValueError, match="holds no key rotations"):
        validation_scores(values, source, calibration=None)
