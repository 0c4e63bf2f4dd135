"""Per-layer selection among fitted rotations: chosen on the validation split only, merged per unit with each
unit's own view, and read back as the chosen candidates' rotations."""

import torch

from tqlab.data.synthetic import SyntheticKV
from tqlab.fit.select import merge_per_layer, select_per_layer
from tqlab.kv import KVQuantSpec
from tqlab.rotation import make_rotation
from tqlab.rotation.io import load_rotations, save_rotations, unit_name

VIEWS = ("vector", "spinor_plus", "spinor_minus")


class ValidationOnly:
    """A KV source that refuses every split but validation."""

    def __init__(self, source):
        self.source, self.architecture, self.layers = source, source.architecture, source.layers
        self.seen = set()

    def num_sequences(self, split):
        return self.source.num_sequences(split)

    def load(self, split, *args):
        self.seen.add(split)
        assert split == "validation", f"the selector read the {split} split"
        return self.source.load(split, *args)


def candidates(tmp_path, source):
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
