"""Fine-tuning evaluation (label subsets, learning, encoder left untouched, SimCLR v2 projector
start) and the online probe."""

import math

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from sslbench.backbones import ENCODER_FILE, create_backbone, save_encoder
from sslbench.config import build_config, dump_yaml
from sslbench.core.augment import eval_batch
from sslbench.core.errors import UserError
from sslbench.data import ImageSplit
from sslbench.evals.finetune import (
    FinetuneModel,
    finetune,
    finetune_model,
    finetune_steps,
    fraction_tag,
    label_subset,
    metric_name,
    projector_layers,
    start_lr_factor,
    top_second_moment,
)
from sslbench.evals.online_probe import OnlineProbe

TINY = (8, 16, 32, 64)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run many times faster on one thread than on two on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


COLOURS = torch.tensor([[220, 40, 40], [40, 220, 40], [40, 40, 220], [220, 220, 40], [40, 220, 220]], dtype=torch.float32)


def colour_split(per_class, seed, size=32, id_offset=0):
    """Class c: images tinted with COLOURS[c] plus noise; pixel (0, 0) of channel 0..1 encodes a
    unique image id, so that images can be told apart exactly."""
    g = torch.Generator().manual_seed(seed)
    images, labels = [], []
    uid = id_offset
    for c, n in enumerate(per_class):
        for _ in range(n):
            noise = torch.randn(3, size, size, generator=g) * 25
            img = (COLOURS[c][:, None, None] + noise).clamp(0, 255).to(torch.uint8)
            img[0, 0, 0], img[1, 0, 0] = uid // 256, uid % 256
            images.append(img)
            labels.append(c)
            uid += 1
    return ImageSplit(torch.stack(images), torch.tensor(labels), [f"c{i}" for i in range(len(per_class))])


def image_ids(split):
    return {int(img[0, 0, 0]) * 256 + int(img[1, 0, 0]) for img in split.images}


def tiny_encoder(seed=0):
    torch.manual_seed(seed)
    return create_backbone("resnet18", 32, channels=TINY)


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same_state(module, before):
    after = module.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} changed"


# ---------------------------------------------------------------------------------------------
# Label subsets


def test_label_subsets_are_class_balanced_seeded_and_drawn_from_train_only():
    train = colour_split([20, 30, 41, 9], seed=0)
    test = colour_split([10, 10, 10, 10], seed=1, id_offset=1000)
    assert not image_ids(train) & image_ids(test)
    for fraction in (0.01, 0.1, 0.5, 1.0):
        sub, idx = label_subset(train, fraction, seed=3)
        counts = torch.bincount(sub.labels, minlength=4).tolist()
        expected = [max(1, math.floor(fraction * n + 0.5)) for n in (20, 30, 41, 9)]
        assert counts == expected, (fraction, counts)
        assert torch.equal(idx, idx.sort().values) and idx.unique().numel() == idx.numel()
        assert torch.equal(sub.images, train.images[idx]) and torch.equal(sub.labels, train.labels[idx])
        assert image_ids(sub) <= image_ids(train) and not image_ids(sub) & image_ids(test)
        _, idx2 = label_subset(train, fraction, seed=3)
        assert torch.equal(idx, idx2)
    _, a = label_subset(train, 0.5, seed=0)
    _, b = label_subset(train, 0.5, seed=1)
    assert not torch.equal(a, b)
    assert label_subset(train, 1.0, seed=5)[1].tolist() == list(range(len(train)))


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.01, 2, float("nan"), True])
def test_label_fraction_outside_unit_interval_is_user_error(bad):
    train = colour_split([4, 4], seed=0)
    with pytest.raises(UserError, match=r"label fraction must be in \(0, 1\]"):
        label_subset(train, bad, seed=0)


def test_finetune_steps_are_full_batches_and_at_least_min_steps():
    assert finetune_steps(1347, epochs=10, batch_size=256, min_steps=0) == 50  # 5 full batches per epoch
    assert finetune_steps(10, epochs=10, batch_size=256, min_steps=0) == 10  # one batch of 10
    assert finetune_steps(10, epochs=10, batch_size=256, min_steps=200) == 200
    assert finetune_steps(1347, epochs=100, batch_size=256, min_steps=200) == 500


def test_metric_names_carry_the_fraction():
    assert [fraction_tag(f) for f in (0.01, 0.1, 1, 0.005)] == ["1pct", "10pct", "100pct", "0.5pct"]
    assert metric_name(0.1) == "finetune_10pct_top1" and metric_name(1.0, "top5") == "finetune_100pct_top5"


# ---------------------------------------------------------------------------------------------
# Fine-tuning


def test_finetune_beats_chance_is_deterministic_and_leaves_encoder_untouched():
    train = colour_split([16] * 4, seed=0)
    test = colour_split([8] * 4, seed=1, id_offset=1000)
    encoder = tiny_encoder()
    encoder.train()
    before = snapshot(encoder)
    kwargs = {"fraction": 1.0, "image_size": 32, "epochs": 4, "batch_size": 16, "lr": 0.05, "seed": 0, "min_steps": 0}
    out = finetune(encoder, train, test, **kwargs)
    assert set(out) == {"finetune_100pct_top1"}  # 4 classes: no top-5
    assert out["finetune_100pct_top1"] >= 75.0, out  # chance is 25%
    assert_same_state(encoder, before)
    assert encoder.training and all(p.grad is None for p in encoder.parameters())
    assert finetune(encoder, train, test, **kwargs) == out  # same seed, same result


def test_finetune_reports_top5_with_five_classes_or_more():
    train = colour_split([4] * 4 + [4], seed=0)
    test = colour_split([2] * 5, seed=1, id_offset=1000)
    out = finetune(tiny_encoder(), train, test, fraction=0.5, image_size=32, epochs=1, batch_size=8, min_steps=3)
    assert set(out) == {"finetune_50pct_top1", "finetune_50pct_top5"}
    assert all(0.0 <= v <= 100.0 for v in out.values())


def _fake_run(tmp_path, projector):
    """A run directory as the trainer leaves it (config, encoder, method), without training; the
    projector gets random non-default weights and BN statistics so loading is observable."""
    cfg = build_config(
        flags={"method": "simclr", "backbone": "resnet18", "output": str(tmp_path)},
        sets=[f"projector={projector}", "proj_hidden_dim=32", "proj_dim=16", "backbone_kwargs.channels=8,16,32,64"],
    )
    from sslbench.config.build import build_method

    torch.manual_seed(1)
    method = build_method(cfg)
    with torch.no_grad():
        for m in method.projector.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.yaml").write_text(dump_yaml(cfg))
    save_encoder(method.encoder, tmp_path / ENCODER_FILE, meta={"backbone": "resnet18"})
    save_file({k: v.contiguous() for k, v in method.state_dict().items()}, str(tmp_path / "method.safetensors"))
    return method


def test_finetune_from_first_projector_layer_of_a_simclr_v2_run(tmp_path):
    method = _fake_run(tmp_path / "v2", "v2")
    head = projector_layers(tmp_path / "v2", 1)
    assert [type(m) for m in head] == [nn.Linear, nn.BatchNorm1d, nn.ReLU]
    src = method.projector
    for got, ref in ((head[0], src[0]), (head[1], src[1])):
        for k, v in ref.state_dict().items():
            assert torch.equal(got.state_dict()[k], v), k
    assert len(projector_layers(tmp_path / "v2", 2)) == 6
    with pytest.raises(UserError, match=r"from_projector_layer must be in 0\.\.2"):
        projector_layers(tmp_path / "v2", 3)

    train = colour_split([8] * 4, seed=0)
    test = colour_split([4] * 4, seed=1, id_offset=1000)
    model = FinetuneModel(method.encoder, 4, projector=head, image_size=32)
    assert model.head.in_features == 32  # the projector's hidden width, not the encoder's 64
    head_before = snapshot(head)
    out = finetune(method.encoder, train, test, fraction=1.0, image_size=32, epochs=1, batch_size=16, projector=head, min_steps=0)
    assert set(out) == {"finetune_100pct_top1"}
    assert_same_state(head, head_before)


def test_projector_layer_beyond_a_v1_projector_and_mismatched_method_file_fail(tmp_path):
    _fake_run(tmp_path / "v1", "v1")
    assert len(projector_layers(tmp_path / "v1", 1)) == 3
    with pytest.raises(UserError, match=r"from_projector_layer must be in 0\.\.1"):
        projector_layers(tmp_path / "v1", 2)
    # a v1 method file under a v2 config: strict check, never a partial load
    _fake_run(tmp_path / "v2", "v2")
    (tmp_path / "v2" / "method.safetensors").write_bytes((tmp_path / "v1" / "method.safetensors").read_bytes())
    with pytest.raises(UserError, match="does not match"):
        projector_layers(tmp_path / "v2", 1)


# ---------------------------------------------------------------------------------------------
# Online probe


def test_online_probe_learns_on_detached_features_without_touching_the_encoder():
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    encoder.train()
    train = colour_split([24] * 4, seed=0)
    test = colour_split([8] * 4, seed=1, id_offset=1000)
    probe = OnlineProbe(8, 4, image_size=32, train_labels=train.labels, test_split=test)
    before = snapshot(encoder)
    chance = probe.evaluate(encoder)
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        idx = torch.randperm(len(train), generator=g)[:32]
        loss = probe.step(encoder, eval_batch(train.images[idx], 32), idx)
        assert loss is not None and math.isfinite(loss)
    top1 = probe.evaluate(encoder)
    assert top1 >= 90.0 and top1 > chance
    assert_same_state(encoder, before)  # eval-mode features: no BatchNorm statistics moved
    assert encoder.training and all(p.grad is None for p in encoder.parameters())
    assert probe.update(torch.zeros(1, 8), torch.zeros(1, dtype=torch.long)) is None  # batch of one: skipped


def test_online_probe_logs_at_epoch_ends_and_the_last_step():
    class Sched:
        steps_per_epoch, total_steps = 3, 7

    encoder = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    train = colour_split([6] * 4, seed=0)
    test = colour_split([2] * 4, seed=1, id_offset=1000)
    probe = OnlineProbe(3, 4, image_size=32, train_labels=train.labels, test_split=test)
    logged = []
    for done in range(1, 8):
        idx = torch.arange(4) * 6 + done % 6
        rec = probe.after_step(encoder, eval_batch(train.images[idx], 32), idx, done, Sched)
        if rec is not None:
            logged.append((rec["step"], rec["epoch"]))
            assert set(rec) == {"step", "epoch", "online_probe_top1"} and 0 <= rec["online_probe_top1"] <= 100
    assert logged == [(3, 1.0), (6, 2.0), (7, round(7 / 3, 4))]


def test_online_probe_leaves_the_training_run_bitwise_unchanged_also_with_stochastic_layers(tmp_path, monkeypatch):
    """The probe head's initialisation drew from the global RNG: with drop-path the SSL run with
    the probe differed from the one without (93 of 126 encoder tensors after 2 steps)."""
    from safetensors.torch import load_file

    from sslbench.commands.cli import main

    monkeypatch.setenv("SSLBENCH_CACHE", str(tmp_path / "cache"))
    common = [
        "train",
        "--method",
        "simclr",
        "--steps",
        "2",
        "--batch-size",
        "16",
        "--train-subset",
        "32",
        "--quiet",
        "--set",
        "backbone_kwargs.channels=8,16,32,64",
        "--set",
        "backbone_kwargs.drop_path_rate=0.2",
        "--set",
        "quick_knn=false",
        "--set",
        "deterministic=true",
    ]
    for name, probe in (("off", "false"), ("on", "true")):
        assert main([*common, "--set", f"online_probe={probe}", "--output", str(tmp_path / name)]) == 0
    off, on = (load_file(str(tmp_path / n / "method.safetensors")) for n in ("off", "on"))
    assert off.keys() == on.keys()
    assert [k for k in off if not torch.equal(off[k], on[k])] == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (fp16 autocast is GPU-only)")
def test_fp16_fine_tuning_on_a_gpu_scales_the_loss_and_learns():
    train = colour_split([16] * 4, seed=0)
    test = colour_split([8] * 4, seed=1, id_offset=1000)
    encoder = tiny_encoder().cuda()
    kwargs = {"fraction": 1.0, "image_size": 32, "epochs": 4, "batch_size": 16, "lr": 0.05, "seed": 0, "min_steps": 0}
    out = finetune(encoder, train, test, device="cuda", precision="fp16", **kwargs)
    assert out["finetune_100pct_top1"] >= 75.0, out


# ---------------------------------------------------------------------------------------------
# The fine-tuning lr from a projector layer


def test_top_second_moment_is_the_largest_eigenvalue_of_the_uncentred_second_moment():
    g = torch.Generator().manual_seed(0)
    for x in (torch.randn(300, 40, generator=g).relu(), torch.randn(300, 40, generator=g) * torch.linspace(0.1, 3, 40)):
        ref = torch.linalg.eigvalsh((x.double().T @ x.double()) / x.shape[0])[-1].item()
        assert top_second_moment(x) == pytest.approx(ref, rel=1e-4)
    assert top_second_moment(torch.zeros(10, 5)) == 0.0
    assert top_second_moment(torch.full((10, 5), 2.0)) == pytest.approx(20.0)  # ||(2,...,2)||^2


def _wide_start(encoder, width=1024, seed=0):
    """A SimCLR-like first projector layer: Linear -> BatchNorm -> ReLU to many units (BN statistics
    taken on the data, as after pretraining), whose features carry far more curvature than h."""
    torch.manual_seed(seed)
    head = nn.Sequential(nn.Linear(64, width), nn.BatchNorm1d(width), nn.ReLU())
    with torch.no_grad():
        x = colour_split([16] * 4, seed=5, id_offset=3000).images
        h = encoder.eval()(eval_batch(x, 32)).flatten(1)
        head.train()(h)  # running statistics of this data
    return head.eval()


def test_start_lr_factor_is_the_curvature_ratio_and_never_raises_the_lr():
    encoder = tiny_encoder()
    images = colour_split([8] * 4, seed=0).images
    head = _wide_start(encoder)
    model = FinetuneModel(encoder, 4, projector=head, image_size=32)
    model.eval()
    with torch.no_grad():
        h = encoder(eval_batch(images, 32)).flatten(1)
        f = head(h)
    by_hand = top_second_moment(h) / top_second_moment(f)
    assert 0 < by_hand < 0.5
    assert start_lr_factor(model, images, image_size=32, seed=0) == pytest.approx(by_hand, rel=1e-4)
    assert start_lr_factor(FinetuneModel(encoder, 4, image_size=32), images, image_size=32, seed=0) == 1.0  # from h
    shrink = nn.Sequential(nn.Linear(64, 64), nn.ReLU())
    with torch.no_grad():
        shrink[0].weight.copy_(torch.eye(64) * 0.1)
        shrink[0].bias.zero_()
    small = FinetuneModel(encoder, 4, projector=shrink, image_size=32)
    assert start_lr_factor(small, images, image_size=32, seed=0) == 1.0  # smaller curvature: lr kept


def test_finetuning_from_a_wide_projector_layer_learns_at_the_default_lr_with_curvature_scaling():
    """The lr that suits h (0.2) diverges from 1,024 post-ReLU projector features without the
    scaling (SimCLR v2 runs of leaderboards/claims: chance); with it the start learns."""
    train = colour_split([16] * 4, seed=0)
    test = colour_split([8] * 4, seed=1, id_offset=1000)
    encoder = tiny_encoder()
    kwargs = {"fraction": 1.0, "image_size": 32, "epochs": 4, "batch_size": 16, "lr": 0.2, "seed": 0, "min_steps": 0}
    model, scaled = finetune_model(encoder, train, test, projector=_wide_start(encoder), **kwargs)
    assert model.lr_factor < 0.5
    assert scaled["finetune_100pct_top1"] >= 75.0, scaled
    try:
        _, plain = finetune_model(encoder, train, test, projector=_wide_start(encoder), lr_scaling="none", **kwargs)
        assert plain["finetune_100pct_top1"] <= 50.0, plain
    except UserError as e:  # diverged to a non-finite loss
        assert "diverged" in str(e)


def test_from_h_the_lr_scaling_changes_nothing():
    train = colour_split([8] * 4, seed=0)
    test = colour_split([4] * 4, seed=1, id_offset=1000)
    kwargs = {"fraction": 1.0, "image_size": 32, "epochs": 1, "batch_size": 16, "seed": 0, "min_steps": 3}
    model, out = finetune_model(tiny_encoder(), train, test, **kwargs)
    assert model.lr_factor == 1.0
    assert finetune_model(tiny_encoder(), train, test, lr_scaling="none", **kwargs)[1] == out
    with pytest.raises(UserError, match="unknown fine-tuning lr scaling 'lars'; use one of curvature, none"):
        finetune_model(tiny_encoder(), train, test, lr_scaling="lars", **kwargs)


def test_the_lr_scaling_is_a_checked_flag_recorded_in_the_row_and_the_reuse_key(capsys):
    from sslbench.commands.cli import main
    from sslbench.config import TrainConfig
    from sslbench.evals.finetune import finetune_protocol
    from sslbench.evaluation.protocols import EvalOptions, reusable

    assert main(["eval", "nowhere", "--protocol", "finetune", "--finetune-lr-scaling", "lars"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--finetune-lr-scaling" in err[0] and "curvature" in err[0], err
    cfg = TrainConfig(data="digits")

    def row(record, depth):
        return {"label_fraction": 0.1, "protocol": {**record, "name": "finetune", "eval_data": "digits", "features": depth}, "metrics": {}}

    new = finetune_protocol(fraction=0.1, n_labelled=10, from_projector_layer=1, lr_factor=0.1)
    assert (new["lr_scaling"], new["lr_factor"]) == ("curvature", 0.1)
    old = {k: v for k, v in new.items() if k not in ("lr_scaling", "lr_factor")}  # stored before the option
    curvature = EvalOptions(protocols=["finetune"], fractions=[0.1], features=["proj1"])
    plain = EvalOptions(protocols=["finetune"], fractions=[0.1], features=["proj1"], settings={"finetune_lr_scaling": "none"})
    assert reusable(curvature, cfg, [row(old, "proj1")])[1] is not None  # fine-tuned at the plain lr: again
    assert reusable(plain, cfg, [row(old, "proj1")])[1] is None
    assert reusable(curvature, cfg, [row(new, "proj1")])[1] is None
    assert reusable(plain, cfg, [row(new, "proj1")])[1] is not None
    from_h = {**old, "from_projector_layer": 0}
    assert reusable(EvalOptions(protocols=["finetune"], fractions=[0.1]), cfg, [row(from_h, "h")])[1] is None  # factor 1 from h


# ---------------------------------------------------------------------------------------------
# The fine-tuning optimizer: AdamW for vision transformers (MAE's recipe), SGD otherwise

VIT_KWARGS = {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8}


def tiny_vit(seed=0, feature_scale=1.0):
    """A 2-block ViT at 32 px; ``feature_scale`` multiplies its final norm's weight, so that its
    pooled feature has the large second moment of a trained ViT-Tiny (top eigenvalue of E[hh^T]
    217 against 39 for the narrow ResNet-18 of the committed runs)."""
    torch.manual_seed(seed)
    vit = create_backbone("vit_tiny_patch16_224", 32, **VIT_KWARGS)
    with torch.no_grad():
        vit.norm.weight.mul_(feature_scale)
    return vit


def test_auto_fine_tunes_vision_transformers_with_adamw_and_other_encoders_with_sgd():
    from sslbench.backbones import is_vision_transformer_backbone
    from sslbench.evals.finetune import resolve_optimizer

    assert resolve_optimizer("auto", tiny_vit()) == "adamw"
    assert resolve_optimizer("auto", tiny_encoder()) == "sgd"
    assert resolve_optimizer("sgd", tiny_vit()) == "sgd" and resolve_optimizer("adamw", tiny_encoder()) == "adamw"
    with pytest.raises(UserError, match="unknown fine-tuning optimizer 'adam'; use one of auto, sgd, adamw"):
        resolve_optimizer("adam", tiny_vit())
    # from a run's config, without building weights
    assert is_vision_transformer_backbone("vit_tiny_patch16_224", 32, VIT_KWARGS)
    assert is_vision_transformer_backbone("vit_small_patch16_224", 224)
    assert not is_vision_transformer_backbone("resnet18", 32, {"channels": list(TINY)})
    assert not is_vision_transformer_backbone("convnext_atto", 32)


def test_finetune_groups_keep_the_layer_decay_and_exempt_biases_norms_and_embeddings_from_weight_decay():
    from sslbench.evals.finetune import finetune_groups, layer_decay_groups

    model = FinetuneModel(tiny_vit(), 4, image_size=32)
    groups = finetune_groups(model, 0.5, weight_decay=0.05)
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())  # each parameter once
    scale = {id(p): g["lr_scale"] for g in layer_decay_groups(model, 0.5) for p in g["params"]}
    exempt = {"encoder.pos_embed", "encoder.cls_token"}  # MAE's no_weight_decay list
    for name, p in model.named_parameters():
        (group,) = [g for g in groups if any(q is p for q in g["params"])]
        assert group["lr_scale"] == scale[id(p)], name
        norm = ".norm" in name  # the blocks' norm1/norm2 and the final norm
        want = 0.0 if p.ndim <= 1 or norm or name in exempt else 0.05
        assert group["weight_decay"] == want, name
    assert {g["weight_decay"] for g in groups} == {0.0, 0.05}
    assert {g["weight_decay"] for g in finetune_groups(model, 1.0)} == {0.0}  # SGD: none at all


def test_a_vit_fine_tunes_at_the_defaults_whatever_its_feature_scale_where_sgd_at_its_default_lr_does_not():
    """The default (``auto``: AdamW, lr 1e-3, warm-up) learns from a ViT whose pooled feature is
    16x larger (a second moment 256x larger: the SimCLR ViT-Tiny run's was 5.6x a ResNet's, and SGD
    at 0.2 diverged at step 19 there); SGD at its default lr 0.2 stays at chance or diverges."""
    train = colour_split([16] * 4, seed=0)
    test = colour_split([8] * 4, seed=1, id_offset=1000)
    kwargs = {"fraction": 1.0, "image_size": 32, "epochs": 4, "batch_size": 16, "seed": 0, "min_steps": 0}
    for scale in (1.0, 16.0):
        model, adamw = finetune_model(tiny_vit(feature_scale=scale), train, test, **kwargs)
        assert (model.optimizer, model.lr, model.lr_factor) == ("adamw", 1e-3, 1.0)
        assert adamw["finetune_100pct_top1"] >= 75.0, (scale, adamw)
    try:
        model, sgd = finetune_model(tiny_vit(feature_scale=16.0), train, test, optimizer="sgd", **kwargs)
        assert (model.optimizer, model.lr) == ("sgd", 0.2)
        assert sgd["finetune_100pct_top1"] <= 50.0, sgd
    except UserError as e:  # diverged to a non-finite loss
        assert "diverged" in str(e)


def test_the_finetune_optimizer_is_a_checked_flag_recorded_in_the_row_and_the_reuse_key(capsys):
    from sslbench.commands.cli import main
    from sslbench.config import TrainConfig
    from sslbench.evals.finetune import finetune_protocol
    from sslbench.evaluation.protocols import EvalOptions, reusable

    assert main(["eval", "nowhere", "--protocol", "finetune", "--finetune-optimizer", "adam"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--finetune-optimizer" in err[0] and "adamw" in err[0], err
    vit = TrainConfig(data="digits", backbone="vit_tiny_patch16_224", image_size=32, backbone_kwargs=dict(VIT_KWARGS))
    resnet = TrainConfig(data="digits", backbone="resnet18", image_size=32, backbone_kwargs={"channels": list(TINY)})

    def row(record):
        return {"label_fraction": 0.1, "protocol": {**record, "name": "finetune", "eval_data": "digits", "features": "h"}, "metrics": {}}

    sgd = finetune_protocol(fraction=0.1, n_labelled=10, lr=0.2)
    adamw = finetune_protocol(fraction=0.1, n_labelled=10, lr=1e-3, optimizer="adamw", lr_scaling="none")
    assert (sgd["optimizer"], sgd["nesterov"], sgd["weight_decay"]) == ("sgd", True, 0.0) and "warmup_steps" not in sgd
    assert (adamw["optimizer"], adamw["betas"], adamw["weight_decay"], adamw["warmup_steps"]) == ("adamw", [0.9, 0.999], 0.05, 10)
    auto = EvalOptions(protocols=["finetune"], fractions=[0.1])
    forced_sgd = EvalOptions(protocols=["finetune"], fractions=[0.1], settings={"finetune_optimizer": "sgd"})
    assert reusable(auto, vit, [row(adamw)])[1] is None
    assert reusable(auto, vit, [row(sgd)])[1] is not None  # a ViT row fine-tuned with SGD: not what auto means
    assert reusable(forced_sgd, vit, [row(sgd)])[1] is None
    assert reusable(auto, resnet, [row(sgd)])[1] is None  # rows of other encoders stay reusable
    assert reusable(auto, resnet, [row(adamw)])[1] is not None
    other_lr = EvalOptions(protocols=["finetune"], fractions=[0.1], settings={"finetune_lr": 5e-4})
    assert reusable(other_lr, vit, [row(adamw)])[1] is not None
