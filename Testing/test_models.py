"""Site models load from cards, weights and bundles without running anyone's code; bad sets are named."""

import json
import os
import shutil
from dataclasses import replace

import pytest
import torch
import yaml

from conftest import make_card, shared_file
from entropymerge.compatibility import check_compatible
from entropymerge.errors import CodeExecutionRefused, UserInputError
from entropymerge.modelcard import FeatureSpec, ModelCard
from entropymerge.models import load_site_model, load_site_models, load_state_dict_file
from entropymerge.safeconfig import build_network

BUNDLE = "monai_bundle_segmentation_template"


class FileCreatingPayload:
    """Unpickling this would run os.system and create the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def outputs_of(network, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        return network.eval()(torch.rand(1, 1, 32, 32, 32))


def test_card_with_safetensors_loads_and_round_trips(model_factory):
    card_path = model_factory("alpha", seed=3)
    model = load_site_model(card_path)
    assert model.name == "alpha" and model.kind == "weights"
    assert model.card.labels[1].name == "structure 1" and model.card.num_classes == 3
    again = ModelCard.from_json(json.loads(card_path.read_text(encoding="utf-8")), card_path)
    assert again.to_json() == model.card.to_json()
    # the weights file given directly finds its card beside it
    direct = load_site_model(card_path.with_suffix(".safetensors"))
    torch.testing.assert_close(outputs_of(direct.network), outputs_of(model.network))


def test_pt_state_dict_in_common_wrappers(tmp_path, model_factory):
    model = load_site_model(model_factory("alpha"))
    wrapped = {"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 7}
    torch.save(wrapped, tmp_path / "alpha.pt")
    shutil.copy(model.source, tmp_path / "alpha.json")
    loaded = load_site_model(tmp_path / "alpha.pt")
    torch.testing.assert_close(outputs_of(loaded.network), outputs_of(model.network))


def test_malicious_pickle_is_refused_without_running(tmp_path, model_factory):
    marker = tmp_path / "payload-ran"
    card_path = model_factory("evil")
    evil = card_path.with_name("evil.pt")
    torch.save({"model.0.conv.weight": FileCreatingPayload(marker)}, evil)
    card_path.unlink()
    card_path.with_suffix(".safetensors").unlink()
    shutil.copy(model_factory("template", folder=tmp_path / "t"), evil.with_suffix(".json"))
    with pytest.raises(UserInputError, match="refused to load .*evil.pt: it holds Python objects other than tensors"):
        load_site_model(evil)
    assert not marker.exists(), "the pickle payload must never run"


def test_file_that_is_not_a_state_dict(tmp_path):
    torch.save([torch.zeros(3), torch.ones(2)], tmp_path / "list.pt")
    with pytest.raises(UserInputError, match="does not contain a state dict .* got list"):
        load_state_dict_file(tmp_path / "list.pt")
    (tmp_path / "text.pt").write_text("certainly not weights", encoding="utf-8")
    with pytest.raises(UserInputError, match="not a PyTorch weights file"):
        load_state_dict_file(tmp_path / "text.pt")
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(UserInputError, match="not a valid safetensors file"):
        load_state_dict_file(tmp_path / "broken.safetensors")


def test_nan_weights_are_refused(tmp_path, model_factory):
    model = load_site_model(model_factory("alpha"))
    state = model.state_dict()
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key][0] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    with pytest.raises(UserInputError, match=f"NaN or infinite values \\(first in '{key}'\\)"):
        load_state_dict_file(tmp_path / "nan.pt")


def test_weights_that_do_not_fit_the_card(tmp_path, model_factory):
    card_path = model_factory("alpha")
    other = model_factory("beta", classes=4, folder=tmp_path / "other")
    shutil.copy(other.with_suffix(".safetensors"), card_path.with_suffix(".safetensors"))
    with pytest.raises(UserInputError, match="do not fit the network .* wrong shape"):
        load_site_model(card_path)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"labels": [{"name": "background"}]}, "field 'labels' must list at least two labels"),
        ({"preprocessing": {"orientation": "RAX"}}, "field 'preprocessing.orientation' must be three axis codes"),
        ({"preprocessing": {"intensity": [{"_target_": "os.system"}]}}, "'os.system' is not a supported intensity transform"),
        ({"inference": {"roi_size": [32, 32]}}, "field 'inference.roi_size' must be three positive integers"),
        ({"input_channels": 2}, "field 'network.in_channels' must equal input_channels"),
        ({"colour": "red"}, "field 'colour' is not a model card field"),
        ({"features": {"extractor": "mind-ssc", "version": "1", "channels": 12}}, "field 'input_channels' is 1 but the image plus 12"),
    ],
)
def test_card_validation_names_the_field(tmp_path, change, message):
    data = make_card().to_json()
    data.update(change)
    with pytest.raises(UserInputError, match=message):
        ModelCard.from_json(data, tmp_path / "card.json")


def test_network_target_must_be_a_monai_network():
    with pytest.raises(UserInputError, match="'_target_: os.system' is not a MONAI network"):
        build_network({"_target_": "os.system", "command": "true"}, "card")
    with pytest.raises(UserInputError, match="is not a MONAI network"):
        build_network({"_target_": "torch.nn.Module"}, "card")


def test_incompatible_sets_name_the_first_mismatch_and_both_files(tmp_path, model_factory):
    a = model_factory("a", folder=tmp_path / "a")
    four_classes = model_factory("b", classes=4, folder=tmp_path / "b")
    with pytest.raises(UserInputError) as error:
        check_compatible(load_site_models([a, four_classes]))
    message = str(error.value)
    assert str(a) in message and str(four_classes) in message
    assert "parameter 'model.0.conv.unit0.conv.weight'" not in message  # the first difference is the head's shape
    assert "has shape" in message

    other_spacing = model_factory("c", spacing=(1.0, 1.0, 1.0), folder=tmp_path / "c")
    with pytest.raises(UserInputError, match="preprocessing differs"):
        check_compatible(load_site_models([a, other_spacing]))

    relabelled = load_site_model(model_factory("d", folder=tmp_path / "d"))
    relabelled.card = replace(relabelled.card, labels=tuple(replace(l, name=l.name.upper()) for l in relabelled.card.labels))
    with pytest.raises(UserInputError, match="labels differ"):
        check_compatible([load_site_model(a), relabelled])

    featured = load_site_model(model_factory("e", folder=tmp_path / "e"))
    featured.card = replace(featured.card, features=FeatureSpec("mind-ssc", "1", 12))
    with pytest.raises(UserInputError, match="stable-feature specs differ: none \\(image only\\) vs mind-ssc v1"):
        check_compatible([load_site_model(a), featured])


def test_duplicate_names_become_unique(tmp_path, model_factory):
    a = model_factory("same", folder=tmp_path / "one")
    b = model_factory("same", folder=tmp_path / "two")
    assert [m.name for m in load_site_models([a, b])] == ["same", "same-2"]


def test_folder_of_cards_expands(tmp_path, model_factory):
    for name in ("x", "y", "z"):
        model_factory(name, folder=tmp_path / "pool")
    assert [m.name for m in load_site_models([tmp_path / "pool"])] == ["x", "y", "z"]


def test_real_bundle_loads_without_evaluating_expressions(monkeypatch):
    def refuse(self):
        raise AssertionError("a $ expression was evaluated")

    monkeypatch.setattr("entropymerge.safeconfig.ConfigResolver._monai_parser", refuse)
    model = load_site_model(shared_file(BUNDLE))
    assert model.kind == "bundle"
    assert sum(p.numel() for p in model.network.parameters()) == 298_829
    assert [l.name for l in model.card.labels] == ["background", "category 1", "category 2", "category 3"]
    assert model.card.preprocessing.intensity == ({"_target_": "ScaleIntensity"},)
    assert model.card.inference.roi_size == (128, 128, 128)


def bundle_copy_with_code(tmp_path, marker):
    root = tmp_path / "bundle"
    shutil.copytree(shared_file(BUNDLE), root)
    config_path = root / "configs" / "inference.yaml"
    config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    config["network_def"]["channels"] = f"$__import__('pathlib').Path('{marker}').touch() or [8, 16, 32, 64]"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return root


def test_bundle_that_needs_code_is_refused_unless_trusted(tmp_path):
    marker = tmp_path / "code-ran"
    root = bundle_copy_with_code(tmp_path, marker)
    with pytest.raises(CodeExecutionRefused, match="'network_def::channels' is a Python expression .*trust this bundle \\(--trust-bundle-code\\)"):
        load_site_model(root)
    assert not marker.exists()
    model = load_site_model(root, trust_code=True)
    assert marker.exists(), "with trust, MONAI evaluates the expression"
    assert sum(p.numel() for p in model.network.parameters()) == 298_829


def test_bundle_yaml_with_python_tags_is_refused(tmp_path):
    root = tmp_path / "bundle"
    shutil.copytree(shared_file(BUNDLE), root)
    marker = tmp_path / "tag-ran"
    config = root / "configs" / "inference.yaml"
    config.write_text(config.read_text(encoding="utf-8") + f"\nboom: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(UserInputError, match="bundle config .* is not valid YAML"):
        load_site_model(root)
    assert not marker.exists()


def test_json_bundle_config(tmp_path):
    root = tmp_path / "bundle"
    shutil.copytree(shared_file(BUNDLE), root)
    config = yaml.safe_load((root / "configs" / "inference.yaml").read_text(encoding="utf-8"))
    (root / "configs" / "inference.yaml").unlink()
    (root / "configs" / "inference.json").write_text(json.dumps(config), encoding="utf-8")
    assert load_site_model(root).card.num_classes == 4


def test_torchscript_needs_trust(tmp_path, model_factory):
    card_path = model_factory("scripted")
    model = load_site_model(card_path)
    scripted = torch.jit.trace(model.network, torch.rand(1, 1, 32, 32, 32))
    scripted.save(str(tmp_path / "scripted.ts"))
    shutil.copy(card_path, tmp_path / "scripted.json")
    with pytest.raises(CodeExecutionRefused, match="TorchScript program, not plain weights.*--trust-bundle-code"):
        load_site_model(tmp_path / "scripted.ts")
    trusted = load_site_model(tmp_path / "scripted.ts", trust_code=True)
    assert trusted.kind == "torchscript"
    torch.testing.assert_close(outputs_of(trusted.network), outputs_of(model.network))


def test_missing_card_beside_weights(tmp_path, model_factory):
    card_path = model_factory("lonely")
    card_path.unlink()
    with pytest.raises(UserInputError, match="no model card for .*lonely.safetensors: expected lonely.json beside it"):
        load_site_model(card_path.with_suffix(".safetensors"))
