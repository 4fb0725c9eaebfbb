"""MAE (methods/mae.py): the mask, the loss against an independent float64 implementation, the
encoder on the visible patches only, masks that are a pure function of (seed, epoch, sample) through
the trainer (a killed and resumed run equals an unbroken one; 1 vs 2 processes is
tests/test_multiprocess.py, parametrised over the registry), a short training that learns, the
reconstruction picture, and the fine-tuning protocol's layer-wise lr decay."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from _backbones import VIT, VIT_KWARGS
from _reliability import child_env, fork_cli, make_image_folder
from _steps import batch as make_batch
from PIL import Image
from safetensors.torch import load_file

from sslbench.backbones import create_backbone
from sslbench.commands.cli import main
from sslbench.commands.picture import picture_size
from sslbench.config import TrainConfig, build_config, dump_yaml
from sslbench.core.errors import UserError
from sslbench.core.method import EMBEDDING_LOG, Batch, StepInfo
from sslbench.methods.mae import MAE, MAEConfig, mae_loss, norm_pix_targets, patchify, random_masking, sincos_pos_embed_2d, unpatchify

SIZE = 32  # 4 px patches: an 8 x 8 grid of N = 64 patches


def tiny_vit(**kwargs):
    return create_backbone(VIT, SIZE, **{**VIT_KWARGS, **kwargs})


def tiny_mae(**cfg) -> MAE:
    torch.manual_seed(0)
    return MAE(tiny_vit(), MAEConfig(**cfg))


# ---------------------------------------------------------------------------------------------
# The mask


@pytest.mark.parametrize("ratio", [0.75, 0.5, 0.9, 0.6])
def test_the_mask_keeps_exactly_round_n_times_one_minus_ratio_and_restore_inverts_the_shuffle(ratio):
    g = torch.Generator().manual_seed(1)
    for n in (64, 49, 196, 10):
        keep = round(n * (1 - ratio))
        noise = torch.rand(6, n, generator=g)
        ids_keep, mask, ids_restore = random_masking(noise, keep)
        assert ids_keep.shape == (6, keep) and mask.shape == (6, n) and ids_restore.shape == (6, n)
        assert (mask.sum(1) == n - keep).all()
        ids_shuffle = noise.argsort(dim=1)
        arange = torch.arange(n).expand(6, n)
        assert torch.equal(torch.gather(ids_shuffle, 1, ids_restore), arange)  # restore is the inverse permutation
        assert torch.equal(torch.gather(ids_restore, 1, ids_shuffle), arange)
        for b in range(6):  # the kept patches are the `keep` smallest noise values, and the unmasked ones
            assert set(ids_keep[b].tolist()) == set(noise[b].topk(keep, largest=False).indices.tolist())
            assert set(ids_keep[b].tolist()) == set((mask[b] == 0).nonzero().flatten().tolist())


def test_the_method_keeps_round_n_quarter_patches_and_rejects_a_ratio_that_keeps_none():
    assert tiny_mae().keep == round(64 * 0.25) == 16
    assert tiny_mae(mask_ratio=0.9).keep == round(64 * 0.1) == 6
    with pytest.raises(UserError, match="keeps 0 of 64"):
        tiny_mae(mask_ratio=0.995)
    with pytest.raises(UserError, match="mask_ratio"):
        MAEConfig(mask_ratio=1.0).validate()


def test_masks_are_a_pure_function_of_seed_epoch_and_sample():
    """The mask of a sample is the same whatever batch it sits in (1 vs 2 processes: each holds a
    part of the global batch) and differs between epochs, seeds and samples."""
    n, keep = 64, 16
    idx = torch.tensor([7, 3, 250, 11, 42, 5])

    def masks(index, seed=0, epoch=0):
        info = StepInfo(step=epoch * 10, epoch=epoch, steps_per_epoch=10, total_steps=100, progress=0.0, seed=seed)
        b = Batch([torch.zeros(len(index), 3, SIZE, SIZE)], index, info)
        return random_masking(b.uniform(0, n), keep)[1]

    full = masks(idx)
    assert torch.equal(torch.cat([masks(idx[:3]), masks(idx[3:])]), full)  # two processes' halves
    assert torch.equal(masks(idx[[4, 1]]), full[[4, 1]])  # any subset, any order
    assert not torch.equal(masks(idx, epoch=1), full)
    assert not torch.equal(masks(idx, seed=1), full)
    assert len({tuple(m.tolist()) for m in full}) == len(idx)
    # and the method draws exactly these masks
    mae = tiny_mae()
    info = StepInfo(step=0, epoch=0, steps_per_epoch=10, total_steps=100, progress=0.0, seed=0)
    x = torch.randn(len(idx), 3, SIZE, SIZE)
    assert torch.equal(mae.forward_masked(Batch([x], idx, info))[1], full)
    assert torch.equal(mae.forward_masked(Batch([x[3:]], idx[3:], info))[1], full[3:])


# ---------------------------------------------------------------------------------------------
# Patches, targets and the loss


def test_patchify_is_the_official_layout_and_unpatchify_inverts_it():
    x = torch.randn(2, 3, 12, 8)
    p = 4
    ref = x.reshape(2, 3, 3, p, 2, p).permute(0, 2, 4, 3, 5, 1).reshape(2, 6, p * p * 3)  # nchpwq -> nhwpqc
    assert torch.equal(patchify(x, p), ref)
    assert torch.equal(unpatchify(patchify(x, p), p, (3, 2)), x)
    assert torch.equal(patchify(x, p)[0, 4, :3], x[0, :, 8, 0])  # patch (row 2, col 0), pixel (0, 0), channels 0..2


def test_norm_pix_targets_equal_their_formula():
    patches = torch.randn(3, 5, 12, dtype=torch.float64) * 3 + 1
    got = norm_pix_targets(patches)
    for b in range(3):
        for i in range(5):
            v = patches[b, i].tolist()
            m = sum(v) / len(v)
            var = sum((a - m) ** 2 for a in v) / (len(v) - 1)  # unbiased, as torch's Tensor.var in the official code
            want = [(a - m) / math.sqrt(var + 1e-6) for a in v]
            assert got[b, i].tolist() == pytest.approx(want, rel=1e-12, abs=1e-12)


def _reference_loss(pred, target, mask):
    """The paper's loss as a plain float64 loop: the mean over removed patches of each patch's MSE."""
    total, count = 0.0, 0
    for b in range(pred.shape[0]):
        for i in range(pred.shape[1]):
            if mask[b, i] == 1:
                total += sum((p - t) ** 2 for p, t in zip(pred[b, i].tolist(), target[b, i].tolist())) / pred.shape[2]
                count += 1
    return total / count


def test_the_loss_equals_a_float64_reference_and_ignores_the_visible_patches():
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(4, 16, 12, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randn(4, 16, 12, generator=g, dtype=torch.float64)
    _, mask, _ = random_masking(torch.rand(4, 16, generator=g, dtype=torch.float64), 4)
    loss = mae_loss(pred, target, mask)
    assert loss.item() == pytest.approx(_reference_loss(pred.detach(), target, mask), rel=1e-12)
    loss.backward()
    n_removed = int(mask.sum())
    want_grad = 2 * (pred.detach() - target) / (12 * n_removed) * mask.unsqueeze(-1)
    torch.testing.assert_close(pred.grad, want_grad, rtol=1e-12, atol=1e-15)
    changed = pred.detach() + 5.0 * (1 - mask).unsqueeze(-1) * torch.randn(4, 16, 12, generator=g, dtype=torch.float64)
    assert mae_loss(changed, target, mask).item() == loss.item()  # visible patches do not count


def test_the_training_step_loss_is_the_reference_on_its_own_prediction_and_mask():
    mae = tiny_mae()
    x = torch.randn(4, 3, SIZE, SIZE)
    b = make_batch([x], index=torch.tensor([3, 9, 1, 20]))
    pred, mask, target = mae.forward_masked(b)
    assert torch.equal(target, norm_pix_targets(patchify(x, 4)))
    loss, logs = mae.training_step(b)
    assert loss.item() == pytest.approx(_reference_loss(pred.double(), target.double(), mask), rel=1e-5)
    assert set(logs) == {"loss", EMBEDDING_LOG}
    raw = tiny_mae(norm_pix_loss=False).forward_masked(b)[2]
    assert torch.equal(raw, patchify(x, 4))


def test_sincos_embedding_is_the_official_formula():
    dim, grid = 16, (3, 4)
    got = sincos_pos_embed_2d(dim, grid).double()
    omega = 1.0 / 10000 ** (np.arange(dim // 4) / (dim / 4))
    for r in range(grid[0]):
        for c in range(grid[1]):
            want = np.concatenate([np.sin(c * omega), np.cos(c * omega), np.sin(r * omega), np.cos(r * omega)])
            np.testing.assert_allclose(got[r * grid[1] + c].numpy(), want, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# The encoder sees the visible patches only; evaluation sees timm's pooled feature


def test_the_encoder_blocks_receive_one_plus_a_quarter_of_the_patches():
    mae = tiny_mae()
    shapes = []
    handle = mae.encoder.blocks[0].register_forward_hook(lambda m, i, o: shapes.append(tuple(i[0].shape)))
    mae.training_step(make_batch([torch.randn(5, 3, SIZE, SIZE)]))
    handle.remove()
    assert shapes == [(5, 1 + round(64 * 0.25), 32)]
    decoder_shapes = []
    mae.decoder_blocks[0].register_forward_hook(lambda m, i, o: decoder_shapes.append(tuple(i[0].shape)))
    mae.training_step(make_batch([torch.randn(5, 3, SIZE, SIZE)]))
    assert decoder_shapes == [(5, 1 + 64, mae.cfg.decoder_dim)]


def test_encoding_every_patch_is_timms_forward_features_and_the_encoder_is_the_timm_vit():
    mae = tiny_mae().eval()
    vit = mae.encoder
    x = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        every = torch.arange(64).expand(3, 64)
        torch.testing.assert_close(mae.encode_visible(x, every), vit.forward_features(x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(vit(x), vit.forward_head(vit.forward_features(x), pre_logits=True))  # what evaluation extracts
    assert type(vit).__name__ == "VisionTransformer" and vit.global_pool == "token"


def test_a_non_vit_backbone_is_a_one_line_error_naming_what_works(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SSLBENCH_CACHE", str(tmp_path / "cache"))
    with pytest.raises(UserError, match=r"mae needs a vision transformer, got resnet18 .*vit_\* or deit_\*"):
        MAE(create_backbone("resnet18", SIZE, channels=(8, 16, 32, 64)))
    rc = main(["train", "--method", "mae", "--backbone", "resnet18", "--steps", "1", "--output", str(tmp_path / "r"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "vit_tiny_patch16_224" in err[0], err


def test_recipe_and_views():
    mae = tiny_mae()
    for size in (32, 224):
        r = MAE.recipe(size, "vit")
        assert (r.optimizer, r.lr, r.lr_scaling, r.weight_decay, r.betas) == ("adamw", 1.5e-4, "linear", 0.05, (0.9, 0.95))
    cfg = build_config(flags={"method": "mae", "backbone": VIT, "image_size": SIZE})
    assert cfg.aug.crop_scale == (0.2, 1.0) and cfg.aug.flip_p == 0.5
    assert cfg.aug.jitter_p == cfg.aug.grayscale_p == cfg.aug.blur_p == cfg.aug.solarize_p == 0.0
    assert (cfg.optimizer, cfg.betas, cfg.weight_decay) == ("adamw", (0.9, 0.95), 0.05)
    specs = mae.views(cfg.aug, SIZE)
    assert len(specs) == 1 and specs[0].size == SIZE


# ---------------------------------------------------------------------------------------------
# Through the trainer: a killed and resumed run draws the masks an unbroken one draws


def _args(out, data, *extra, steps=6):
    args = [
        "train",
        "--method",
        "mae",
        "--backbone",
        VIT,
        "--steps",
        str(steps),
        "--batch-size",
        "16",
        "--image-size",
        "16",
        "--precision",
        "no",
        "--data",
        f"imagefolder:{data}",
        "--seed",
        "2",
        "--quiet",
        "--output",
        str(out),
    ]
    sets = [f"backbone_kwargs.{k}={v}" for k, v in VIT_KWARGS.items()]
    for s in (*sets, "checkpoint_every=2", "quick_knn=false", "log_every=1", "deterministic=true", *extra):
        args += ["--set", s]
    return args


@pytest.mark.slow
def test_a_killed_and_resumed_mae_run_equals_an_unbroken_one(tmp_path):
    data = make_image_folder(tmp_path / "data")
    env = child_env(tmp_path / "cache")
    ref = fork_cli(_args(tmp_path / "ref", data), env)
    killed = fork_cli(_args(tmp_path / "killed", data), {**env, "SSLBENCH_TEST_KILL_AT": "step:3"})
    assert ref.wait().returncode == 0, ref.wait().describe()
    assert killed.wait().returncode == -9, killed.wait().describe()
    resumed = fork_cli(["train", "--output", str(tmp_path / "killed"), "--resume", "--quiet"], env).wait()
    assert resumed.returncode == 0 and "from step 2" in resumed.stderr, resumed.describe()
    a, b = load_file(str(tmp_path / "ref" / "method.safetensors")), load_file(str(tmp_path / "killed" / "method.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed MAE run differs from the unbroken one"
    losses = [[json.loads(x)["loss"] for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()] for run in ("ref", "killed")]
    assert losses[0] == losses[1] and len(losses[0]) == 6
    for run in ("ref", "killed"):  # the picture is written at the end of training (of the resumed run too)
        assert Image.open(tmp_path / run / "reconstructions.png").size == picture_size(8, 16)


# ---------------------------------------------------------------------------------------------
# The picture


def test_the_picture_command_writes_a_png_of_the_expected_size_and_refuses_other_methods(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SSLBENCH_CACHE", str(tmp_path / "cache"))
    data = make_image_folder(tmp_path / "data", classes=3, train=8, test=4)
    out = tmp_path / "run"
    rc = main(_args(out, data, "checkpoint_every=0", steps=1))
    assert rc == 0, capsys.readouterr().err
    assert Image.open(out / "reconstructions.png").size == picture_size(8, 16) == (4 * 128 + 5 * 2, 14 + 8 * 128 + 9 * 2)
    rc = main(["picture", str(out), "--output", str(tmp_path / "p.png"), "--images", "3", "--seed", "1"])
    assert rc == 0
    img = Image.open(tmp_path / "p.png")
    assert img.format == "PNG" and img.size == picture_size(3, 16)
    # another method's run: one line, exit 2, before any weights are read
    other = tmp_path / "simclr-run"
    other.mkdir()
    (other / "config.yaml").write_text(dump_yaml(TrainConfig(method="simclr", image_size=16)))
    capsys.readouterr()
    assert main(["picture", str(other)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a simclr run" in err[0] and "mae" in err[0], err
    assert not (other / "reconstructions.png").exists()


def test_the_reconstruction_is_the_prediction_and_the_visible_mask_is_the_methods():
    mae = tiny_mae(norm_pix_loss=False)
    x = torch.randn(2, 3, SIZE, SIZE)
    b = make_batch([x], index=torch.tensor([4, 8]))
    rec = mae.reconstruct(b)
    pred, mask, _ = mae.forward_masked(b)
    torch.testing.assert_close(rec.prediction, unpatchify(pred, 4, (8, 8)))
    assert rec.visible.shape == (2, 1, SIZE, SIZE)
    assert torch.equal(patchify(rec.visible, 4)[..., 0], 1 - mask)
    # with norm_pix_loss, a prediction of 0 (a patch's mean) is shown at the visible patches' mean
    mae = tiny_mae()
    with torch.no_grad():
        mae.decoder_pred.weight.zero_()
        mae.decoder_pred.bias.zero_()
    rec = mae.reconstruct(b)
    patches = patchify(x, 4)
    _, mask, _ = mae.forward_masked(b)
    for i in range(2):
        seen = patches[i][mask[i] == 0]
        assert torch.allclose(rec.prediction[i], seen.mean(dim=1).mean().expand(3, SIZE, SIZE), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Fine-tuning with a layer-wise lr decay (an option of the finetune protocol, for every ViT run)


def test_layer_decay_groups_follow_the_mae_rule():
    from sslbench.evals.finetune import FinetuneModel, layer_decay_groups

    torch.manual_seed(0)
    model = FinetuneModel(tiny_vit(depth=3), 4, image_size=SIZE)
    groups = layer_decay_groups(model, 0.5)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    assert sum(len(g["params"]) for g in groups) == len(scale) == len(list(model.parameters()))
    for name, p in model.named_parameters():
        parts = name.split(".")
        if parts[1] in ("patch_embed", "pos_embed", "cls_token"):
            want = 0.5**4  # the embeddings: layer 0 of L + 1 = 4
        elif parts[1] == "blocks":
            want = 0.5 ** (3 - int(parts[2]))  # block i: layer i + 1
        else:
            want = 1.0  # the final norm and the head
        assert scale[id(p)] == want, name
    assert [g["lr_scale"] for g in layer_decay_groups(model, 1.0)] == [1.0]
    resnet = FinetuneModel(create_backbone("resnet18", SIZE, channels=(8, 16, 32, 64)), 4, image_size=SIZE)
    with pytest.raises(UserError, match="needs a vision transformer encoder"):
        layer_decay_groups(resnet, 0.75)


def test_train_classifier_scales_each_groups_lr():
    import torch.nn.functional as F

    from sslbench.evals.finetune import FinetuneModel, train_classifier

    torch.manual_seed(0)
    model = FinetuneModel(tiny_vit(), 3, image_size=SIZE)
    enc_before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    images = torch.randint(0, 256, (12, 3, SIZE, SIZE), dtype=torch.uint8)
    labels = torch.arange(12) % 3
    groups = [{"params": list(model.encoder.parameters()), "lr_scale": 0.0}, {"params": list(model.head.parameters()), "lr_scale": 1.0}]
    train_classifier(
        model,
        images,
        lambda logits, idx, x: F.cross_entropy(logits, labels[idx]),
        steps=3,
        batch_size=6,
        lr=0.1,
        seed=0,
        image_size=SIZE,
        precision="no",
        groups=groups,
    )
    assert all(torch.equal(v, enc_before[k]) for k, v in model.encoder.state_dict().items())  # lr x 0
    assert model.head.weight.abs().sum() > 0  # lr x 1 (the head starts at zero)


def test_the_layer_decay_is_a_checked_flag_recorded_in_the_row_and_the_reuse_key(capsys):
    from sslbench.evals.finetune import finetune_protocol
    from sslbench.evaluation.protocols import EvalOptions, reusable

    assert main(["eval", "nowhere", "--protocol", "finetune", "--finetune-layer-decay", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--finetune-layer-decay must be in (0, 1]" in err[0], err
    cfg = TrainConfig(data="digits")

    def row(record):
        return {"label_fraction": 0.1, "protocol": {**record, "name": "finetune", "eval_data": "digits"}, "metrics": {}}

    old = finetune_protocol(fraction=0.1, n_labelled=10)
    old.pop("layer_decay")  # a row stored before the option existed
    new = finetune_protocol(fraction=0.1, n_labelled=10, layer_decay=0.75)
    assert new["layer_decay"] == 0.75
    plain = EvalOptions(protocols=["finetune"], fractions=[0.1])
    decayed = EvalOptions(protocols=["finetune"], fractions=[0.1], settings={"finetune_layer_decay": 0.75})
    assert reusable(plain, cfg, [row(old)])[1] is None  # reused: it had no decay
    assert reusable(decayed, cfg, [row(old)])[1] is not None  # evaluated again
    assert reusable(decayed, cfg, [row(new)])[1] is None
    assert reusable(plain, cfg, [row(new)])[1] is not None


# ---------------------------------------------------------------------------------------------
# A short training learns (this is MAE's no-collapse test: see tests/test_no_collapse.py)


@pytest.mark.slow
def test_a_short_training_reconstructs_far_better_than_the_mean_patch_and_beats_the_untrained_knn(tmp_path, monkeypatch):
    """6 epochs (60 steps) on the default data (digits, 16 px, 2 px patches) with a 4-block ViT.

    Collapse, for MAE, is an encoder whose output carries nothing about the image: the decoder,
    which sees only the positions of the visible patches, can then do little better than predict
    the mean (normalised) patch, so the loss on the removed patches of the test images must fall
    well below that of the mean patch. The k-NN on the pooled feature must beat the untrained
    ViT's. Two choices suit a 60-step run rather than the paper's 800 epochs: global average
    pooling of the patch tokens (the feature MAE fine-tunes; the class token is trained by no loss
    and is not informative after so few steps) and lr 3e-3 x B/256 (20x the recipe's)."""
    from sslbench.commands.pipeline import train_and_score
    from sslbench.config.build import load_trained_method
    from sslbench.core.augment import eval_batch
    from sslbench.data import load_split

    monkeypatch.setenv("SSLBENCH_CACHE", str(tmp_path / "cache"))
    sets = [
        "backbone_kwargs.depth=4",
        "backbone_kwargs.embed_dim=96",
        "backbone_kwargs.num_heads=3",
        "backbone_kwargs.global_pool=avg",
        "checkpoint_every=0",
        "lr=3e-3",
    ]
    cfg = build_config(
        flags={"method": "mae", "backbone": VIT, "epochs": 6, "batch_size": 128, "seed": 0, "output": str(tmp_path / "run")}, sets=sets
    )
    train_and_score(cfg, quiet=True)
    metrics = json.loads((tmp_path / "run" / "results.json").read_text())["metrics"]
    assert metrics["knn_top1"] > metrics["untrained_knn_top1"], metrics  # measured: 33.3% vs 29.8%

    _, mae = load_trained_method(tmp_path / "run")
    test = load_split("digits", "test", cfg.image_size)
    x = eval_batch(test.images, cfg.image_size)
    info = StepInfo(step=0, epoch=0, steps_per_epoch=1, total_steps=1, progress=0.0, seed=0)
    with torch.no_grad():
        pred, mask, target = mae.forward_masked(Batch([x], torch.arange(len(test)), info))
    trained = mae_loss(pred, target, mask).item()
    mean_patch = mae_loss(target.mean(dim=(0, 1), keepdim=True).expand_as(target), target, mask).item()
    assert trained < 0.8 * mean_patch, (trained, mean_patch)  # measured: 0.461 vs 0.631
