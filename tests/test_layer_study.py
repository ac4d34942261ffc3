"""The layer study: named blocks per architecture, --list-blocks, --reinit and --freeze (what they change and
what they leave bit-identical), their errors, and a frozen/re-initialised run that resumes exactly."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from cure.checkpoint import load_checkpoint
from cure.cli import main
from cure.config import ConfigError, TrainConfig, resolve_config
from cure.data import DATASETS
from cure.methods import STEP_FUNCTIONS, build_step_context
from cure.models import ARCHS, block_names, build_model, freeze_blocks, model_blocks, reinit_blocks
from cure.train import apply_block_options, train

FMNIST = DATASETS["fashion-mnist"]
EXPECTED = {
    "cnn": ("conv1", "conv2", "fc1", "fc2"),
    "resnet18": ("stem", "layer1", "layer2", "layer3", "layer4", "fc"),
    "preact-resnet18": ("stem", "layer1", "layer2", "layer3", "layer4", "fc"),
    "wrn-34-10": ("stem", "block1", "block2", "block3", "fc"),
    "resnet20": ("stem", "layer1", "layer2", "layer3", "fc"),
}


@pytest.mark.parametrize("arch", ARCHS)
def test_blocks_cover_every_parameter_once(arch):
    assert block_names(arch) == EXPECTED[arch]
    with torch.device("meta"):
        model = build_model(arch, DATASETS["cifar10"])
    blocks = model_blocks(model)
    ids = [id(q) for block in blocks.values() for q in block.parameters()]
    assert len(ids) == len(set(ids)), "a parameter sits in two blocks"
    assert set(ids) == {id(q) for q in model.parameters()}, "a parameter is in no block"


def test_list_blocks_output(capsys):
    assert main(["train", "--arch", "resnet18", "--list-blocks"]) == 0  # no --out needed
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("blocks of resnet18 for fashion-mnist")
    listed = [line.split()[0] for line in out[1:]]
    assert tuple(listed) == EXPECTED["resnet18"]
    counts = [int(line.split()[1].replace(",", "")) for line in out[1:]]
    assert sum(counts) == sum(q.numel() for q in build_model("resnet18", FMNIST).parameters())
    assert counts[0] == 64 * 1 * 9 + 2 * 64  # stem: 3x3 conv on one channel and its BatchNorm
    assert main(["train", "--list-blocks", "--arch", "cnn", "--dataset", "cifar10"]) == 0
    out = capsys.readouterr().out
    assert "blocks of cnn for cifar10" in out and all(name in out for name in EXPECTED["cnn"])


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"freeze": ("layer9",)}, "freeze: 'layer9' is not a block of cnn; its blocks are conv1, conv2, fc1, fc2"),
        ({"reinit": ("stem",)}, "reinit: 'stem' is not a block of cnn; its blocks are conv1, conv2, fc1, fc2"),
        ({"freeze": ("conv1", "conv1")}, "freeze names conv1 more than once"),
        ({"freeze": ("conv1", "conv2", "fc1", "fc2")}, "nothing would be trained"),
        ({"freeze": "conv1"}, "freeze must be a list of block names"),
    ],
)
def test_bad_block_names_are_clear_errors(kw, message):
    with pytest.raises(ConfigError) as info:
        TrainConfig(arch="cnn", **kw).validate()
    assert message in str(info.value)


def test_bad_block_name_on_the_command_line(tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as info:
        main(["train", "--out", str(out), "--arch", "resnet18", "--freeze", "layer1,head"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and not out.exists()
    assert "'head' is not a block of resnet18; its blocks are stem, layer1, layer2, layer3, layer4, fc" in err


def _states(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _block_keys(module, name):
    """state_dict keys of the model that belong to block ``name``."""
    block = model_blocks(module)[name]
    tensors = {id(t) for t in list(block.parameters()) + list(block.buffers())}
    return {k for k, v in module.state_dict(keep_vars=True).items() if id(v) in tensors}


@pytest.mark.parametrize("arch, name", [("cnn", "conv2"), ("resnet20", "layer2"), ("resnet20", "stem")])
def test_reinit_changes_exactly_the_named_block(arch, name):
    torch.manual_seed(0)
    model = build_model(arch, FMNIST)
    with torch.no_grad():  # make every tensor differ from any fresh initialisation
        for t in list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]:
            t.add_(0.5)
    before = _states(model)
    rng = torch.get_rng_state()
    reinit_blocks(model, [name], arch=arch, spec=FMNIST, seed=123)
    assert torch.equal(torch.get_rng_state(), rng), "the global random stream moved"
    after = _states(model)
    keys = _block_keys(model, name)
    assert keys
    torch.manual_seed(123)
    fresh = _states(build_model(arch, FMNIST))
    for key in after:
        if key in keys:
            assert torch.equal(after[key], fresh[key]), f"{key} is not the fresh initialisation"
            if after[key].is_floating_point():
                assert not torch.equal(after[key], before[key]), key
        else:
            assert torch.equal(after[key], before[key]), f"{key} outside {name} changed"


@pytest.mark.parametrize("method", ["at", "trades", "cure", "mart"])
def test_frozen_blocks_stay_bit_identical_while_training(method):
    cfg = TrainConfig(method=method, arch="cnn", lr=0.05, attack_steps=1, eps=0.1, step_size=0.05,
                      freeze=("conv1", "fc2"), weight_decay=5e-3, kernel_backend="auto").validate()
    torch.manual_seed(0)
    module = build_model("cnn", FMNIST)
    apply_block_options(module, cfg)
    frozen = [q for name in cfg.freeze for q in model_blocks(module)[name].parameters()]
    trainable = [q for name in ("conv2", "fc1") for q in model_blocks(module)[name].parameters()]
    assert all(not q.requires_grad for q in frozen) and all(q.requires_grad for q in trainable)
    ctx = build_step_context(cfg, module, eps=0.1, step_size=0.05, attack_seed=1, revision_seed=2)
    in_optimizer = {id(q) for group in ctx.optimizer.param_groups for q in group["params"]}
    assert in_optimizer == {id(q) for q in trainable}
    if ctx.masker is not None:
        assert {id(q) for q in ctx.masker.params} == {id(q) for q in trainable}
    before_frozen = [q.detach().clone() for q in frozen]
    before_trainable = [q.detach().clone() for q in trainable]
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.rand((16, *FMNIST.shape), generator=g)
        y = torch.randint(0, 10, (16,), generator=g)
        result = STEP_FUNCTIONS[method](ctx, x, y)
        assert not bool(result.skipped)
    assert all(torch.equal(a, q) for a, q in zip(before_frozen, frozen)), "a frozen weight moved"
    assert all(not torch.equal(a, q) for a, q in zip(before_trainable, trainable)), "a trainable tensor stood still"
    assert all(q.grad is None for q in frozen)


def test_freeze_blocks_counts_and_leaves_the_rest():
    model = build_model("resnet20", FMNIST)
    n = freeze_blocks(model, ["layer1", "fc"], arch="resnet20")
    assert n == 14_016 + 650
    assert sum(q.numel() for q in model.parameters() if not q.requires_grad) == n


def _tiny(**kw) -> dict:
    base = dict(dataset="fashion-mnist", arch="cnn", epochs=1, batch_size=32, train_samples=128, val_size=16,
                eval_samples=16, attack_steps=1, progress=False, device="cpu", lr=0.05)
    return {**base, **kw}


def test_run_with_init_reinit_and_freeze_records_them_and_resumes_exactly(tmp_path):
    train(resolve_config(_tiny(method="st", train_samples=64)), tmp_path / "st", echo=False)
    init = str(tmp_path / "st" / "last.pt")
    natural = load_checkpoint(init)["model"]
    cfg = resolve_config(_tiny(method="at", init=init, reinit=("conv2",), freeze=("conv1", "fc2")))
    summary = train(cfg, tmp_path / "full", echo=False)
    assert summary["reinit"] == ["conv2"] and summary["freeze"] == ["conv1", "fc2"]
    saved = json.loads((tmp_path / "full" / "config.json").read_text())
    assert saved["reinit"] == ["conv2"] and saved["freeze"] == ["conv1", "fc2"]
    assert TrainConfig.from_dict(saved) == cfg
    final = load_checkpoint(tmp_path / "full" / "last.pt")["model"]
    for key in ("features.0.weight", "features.1.weight", "features.1.bias", "classifier.2.weight",
                "classifier.2.bias"):
        assert torch.equal(final[key], natural[key]), f"frozen {key} moved"
    for key in ("features.4.weight", "classifier.0.weight"):
        assert not torch.equal(final[key], natural[key]), f"{key} was not trained"
    # Interrupted after two steps and resumed: the same weights as the uninterrupted run.
    assert train(cfg, tmp_path / "cut", stop_after_step=2, echo=False) is None
    train(None, tmp_path / "cut", resume=True, echo=False)
    resumed = load_checkpoint(tmp_path / "cut" / "last.pt")["model"]
    for key, value in final.items():
        assert torch.equal(resumed[key], value), f"{key} differs after resume"
    with pytest.raises(ConfigError, match="freeze: saved"):
        train(resolve_config(_tiny(method="at", init=init, freeze=("conv1",))), tmp_path / "cut", resume=True)


def test_layer_study_grid_and_options():
    path = Path(__file__).parents[1] / "scripts" / "layer_study.py"
    spec = importlib.util.spec_from_file_location("layer_study", path)
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    blocks = block_names("cnn")
    cells = study.grid(blocks, study.DEFAULT_VARIANTS)
    assert len(cells) == 2 * len(blocks) + 1 and cells[-1][0] == "all"
    assert study.variant_options("reinit+freeze-others", "conv2", blocks) == {
        "reinit": ("conv2",), "freeze": ("conv1", "fc1", "fc2")}
    assert study.variant_options("freeze-others", "fc2", blocks) == {"reinit": (), "freeze": ("conv1", "conv2", "fc1")}
    assert study.variant_options("reinit", "fc1", blocks) == {"reinit": ("fc1",), "freeze": ()}
    for _, _, options in cells:  # every cell is a valid configuration
        TrainConfig(arch="cnn", **options).validate()
