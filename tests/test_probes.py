"""The multilayer (DINOv2 linear) and attentive (V-JEPA) probes against independent references."""

import copy
import math

import numpy as np
import pytest
import torch

from sslbench.api import Intermediates, create_backbone, eval_batch, extract_features
from sslbench.commands.cli import main
from sslbench.evals.attentive import AttentivePooler, attentive_probe, last_tokens, train_attentive
from sslbench.evals.linear import linear_probe, stratified_split
from sslbench.evals.multilayer import fit_grid, layer_features, multilayer_probe
from sslbench.results import read_rows

VIT4 = ("vit_tiny_patch16_224", {"depth": 4, "embed_dim": 32, "num_heads": 2})
RESNET = ("resnet18", {"channels": (8, 16, 32, 64)})


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _images(n=6, size=32, seed=0):
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _cached(encoder, images, n, avgpool):
    model = Intermediates(encoder, n, lambda layers: layer_features(layers, n, avgpool))
    return extract_features(model, images, image_size=images.shape[-1])


# ---------------------------------------------------------------------------------------------
# multilayer


@pytest.mark.parametrize(("n", "avgpool"), [(4, True), (1, False), (2, True)])
def test_multilayer_vit_features_are_the_last_blocks_cls_and_mean_patch_token(n, avgpool):
    torch.manual_seed(0)
    vit = create_backbone(VIT4[0], 32, **VIT4[1]).eval()
    images = _images()
    got = _cached(vit, images, n, avgpool)
    # float64 reference: timm's blocks run one by one, the final norm on each block's output
    ref = copy.deepcopy(vit).double()
    with torch.no_grad():
        x = ref._pos_embed(ref.patch_embed(eval_batch(images, 32).double()))
        outs = []
        for blk in ref.blocks:
            x = blk(x)
            outs.append(ref.norm(x))
        parts = [o[:, 0] for o in outs[-n:]] + ([outs[-1][:, 1:].mean(dim=1)] if avgpool else [])
        want = torch.cat(parts, dim=1)
    assert got.shape == (6, 32 * (n + avgpool))
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)
    if n == 1 and not avgpool:  # the last block's [CLS] is what the encoder itself outputs
        torch.testing.assert_close(got, extract_features(vit, images, image_size=32), atol=1e-5, rtol=1e-5)


def test_multilayer_convnet_features_are_the_last_stages_average_pooled():
    torch.manual_seed(0)
    net = create_backbone(RESNET[0], 32, **RESNET[1]).eval()
    images = _images()
    got = _cached(net, images, 3, True)  # avgpool has no meaning for a convnet
    ref = copy.deepcopy(net).double()
    with torch.no_grad():
        x = ref.maxpool(ref.act1(ref.bn1(ref.conv1(eval_batch(images, 32).double()))))
        stages = []
        for layer in (ref.layer1, ref.layer2, ref.layer3, ref.layer4):
            x = layer(x)
            stages.append(x.mean(dim=(2, 3)))
        want = torch.cat(stages[-3:], dim=1)
    assert got.shape == (6, 16 + 32 + 64)
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


def _blobs(n, dim=12, classes=3, noise=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(99)) * 1.5
    y = torch.arange(n) % classes
    return centres[y] + noise * torch.randn(n, dim, generator=g), y


def test_multilayer_grid_trained_together_equals_each_classifier_alone():
    x, y = _blobs(150)
    configs = [(lr, wd) for lr in (0.01, 0.3, 2.0) for wd in (0.0, 1e-2)]
    together = fit_grid(x, y, 3, configs, epochs=3, batch_size=32, seed=5)
    for cfg, (w, b) in zip(configs, together):
        ((w1, b1),) = fit_grid(x, y, 3, [cfg], epochs=3, batch_size=32, seed=5)
        torch.testing.assert_close(w, w1, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(b, b1, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(together[0][0], together[-1][0])  # the settings trained differently


def test_multilayer_chooses_the_setting_with_the_best_validation_accuracy():
    x, y = _blobs(300, noise=2.0)
    xt, yt = _blobs(90, noise=2.0, seed=1)
    lrs, wds = (1e-4, 0.05, 1.0), (0.0, 0.1)
    metrics, chosen = multilayer_probe(x, y, xt, yt, lrs=lrs, weight_decays=wds, epochs=4, batch_size=32, seed=3)
    # independently: each setting alone on the same split, scored with numpy
    fit, val = stratified_split(y, 0.1, 3)
    accs = []
    for cfg in [(lr, wd) for lr in lrs for wd in wds]:
        ((w, b),) = fit_grid(x[fit], y[fit], 3, [cfg], epochs=4, batch_size=32, seed=3)
        pred = np.argmax(x[val].numpy() @ w.numpy() + b.numpy(), axis=1)
        accs.append(100.0 * float(np.mean(pred == y[val].numpy())))
    assert chosen["grid_val_top1"] == pytest.approx(accs)
    best = int(np.argmax(accs))
    assert (chosen["best_lr"], chosen["best_wd"]) == [(lr, wd) for lr in lrs for wd in wds][best]
    assert metrics["multilayer_val_top1"] == pytest.approx(max(accs))
    assert min(accs) < max(accs)  # the choice mattered


def test_multilayer_reaches_scikit_learn_logistic_regression_on_separable_features():
    from sklearn.linear_model import LogisticRegression

    x, y = _blobs(400, dim=20, classes=4, noise=1.2)
    xt, yt = _blobs(200, dim=20, classes=4, noise=1.2, seed=1)
    ref = 100.0 * LogisticRegression(max_iter=1000).fit(x.numpy(), y.numpy()).score(xt.numpy(), yt.numpy())
    metrics, _ = multilayer_probe(x, y, xt, yt, epochs=10, batch_size=128, seed=0)
    assert ref > 95.0
    assert metrics["multilayer_top1"] >= ref - 1.0


# ---------------------------------------------------------------------------------------------
# attentive


def _ln(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def _reference_pool(tokens, p, heads):
    """One query, multi-head cross-attention, residual, LayerNorm-MLP residual, in float64, written
    out head by head from V-JEPA's CrossAttentionBlock."""
    b, t, d = tokens.shape
    hd = d // heads
    x = _ln(tokens, p["norm1.weight"], p["norm1.bias"])
    q = p["query"][0, 0] @ p["q.weight"].T + p["q.bias"]  # (D,)
    kv = x @ p["kv.weight"].T + p["kv.bias"]  # (B, T, 2D)
    k, v = kv[..., :d], kv[..., d:]
    out = []
    for h in range(heads):
        sl = slice(h * hd, (h + 1) * hd)
        scores = (k[..., sl] @ q[sl]) / math.sqrt(hd)  # (B, T)
        weights = torch.exp(scores - scores.max(dim=1, keepdim=True).values)
        weights = weights / weights.sum(dim=1, keepdim=True)
        out.append((weights[..., None] * v[..., sl]).sum(dim=1))  # (B, hd)
    a = torch.cat(out, dim=1) @ p["proj.weight"].T + p["proj.bias"]
    y = p["query"][0, 0] + a
    z = _ln(y, p["norm2.weight"], p["norm2.bias"]) @ p["mlp.0.weight"].T + p["mlp.0.bias"]
    z = 0.5 * z * (1 + torch.erf(z / math.sqrt(2)))
    return y + z @ p["mlp.2.weight"].T + p["mlp.2.bias"]


def test_attentive_pooler_equals_a_float64_cross_attention_value_and_gradient():
    torch.manual_seed(0)
    pooler = AttentivePooler(8, 2).double()
    with torch.no_grad():  # non-trivial norms and biases
        for name, param in pooler.named_parameters():
            if name.endswith("bias") or name.startswith("norm"):
                param.add_(0.3 * torch.randn_like(param))
    tokens = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    out = pooler(tokens)
    params = {n: p.detach().clone().requires_grad_() for n, p in pooler.named_parameters()}
    tokens_ref = tokens.detach().clone().requires_grad_()
    ref = _reference_pool(tokens_ref, params, 2)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    torch.testing.assert_close(tokens.grad, tokens_ref.grad, atol=1e-10, rtol=1e-10)
    for name, param in pooler.named_parameters():
        torch.testing.assert_close(param.grad, params[name].grad, atol=1e-10, rtol=1e-10, msg=name)


def _balanced(n, d, g):
    """``n`` random vectors of ``d`` entries, half +1 and half -1: every one has mean 0 and
    variance 1, so the pooler's LayerNorm leaves them as they are."""
    base = torch.tensor([1.0, -1.0]).repeat(d // 2)
    return torch.stack([base[torch.randperm(d, generator=g)] for _ in range(n)])


def _where_task(n, seed, t=8, classes=4, d=8):
    """Tokens ``(n, t, 2d)``: a key half and a value half. One position, drawn per image, has the
    marker as its key; every position's value is the code of a random class; the label is the class
    at the marked position. The mean token (any linear map of it) holds only how often each class
    occurs, not which one is marked: telling needs to select a token by its content."""
    fixed = torch.Generator().manual_seed(123)
    marker, codes = _balanced(1, d, fixed)[0], _balanced(classes, d, fixed)
    g = torch.Generator().manual_seed(seed)
    keys = _balanced(n * t, d, g).view(n, t, d)
    keys[(keys == marker).all(dim=-1)] *= -1  # no other position carries the marker
    cls = torch.randint(0, classes, (n, t), generator=g)
    where = torch.randint(0, t, (n,), generator=g)
    keys[torch.arange(n), where] = marker
    return torch.cat([keys, codes[cls]], dim=-1), cls[torch.arange(n), where]


def test_attentive_probe_learns_which_token_is_marked_and_mean_pooling_does_not():
    xtr, ytr = _where_task(512, 0)
    xte, yte = _where_task(256, 1)
    att = attentive_probe(xtr, ytr, xte, yte, num_heads=2, epochs=25, batch_size=64, lr=3e-3, seed=0)
    lin = linear_probe(xtr.mean(dim=1), ytr, xte.mean(dim=1), yte, epochs=30, seed=0)
    assert att["attentive_top1"] > 90.0, att
    assert lin["linear_top1"] < 55.0, lin  # chance 25%; the class counts alone give about 45%


def test_attentive_training_is_deterministic_given_the_seed():
    x, y = _where_task(64, 0)
    models = []
    for global_seed, seed in ((7, 0), (8, 0), (7, 1)):  # the global random state plays no part
        torch.manual_seed(global_seed)
        models.append(train_attentive(x, y, n_classes=4, num_heads=2, epochs=1, batch_size=16, seed=seed))
    a, b, c = models
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))


def test_attentive_tokens_are_the_last_blocks_patch_tokens():
    torch.manual_seed(0)
    vit = create_backbone(VIT4[0], 32, **VIT4[1]).eval()
    images = _images(3)
    got = extract_features(Intermediates(vit, 1, last_tokens), images, image_size=32, flatten=False)
    with torch.no_grad():
        want = vit.forward_features(eval_batch(images, 32))[:, vit.num_prefix_tokens :]
    assert got.shape == (3, 64, 32)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# the command line


def test_eval_writes_multilayer_and_attentive_rows_and_list_shows_them(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SSLBENCH_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "runs" / "simclr-tiny"
    train = ["train", "--method", "simclr", "--steps", "2", "--batch-size", "32", "--train-subset", "64", "--output", str(out), "--quiet"]
    assert main([*train, "--set", "backbone_kwargs.channels=8,16,32,64", "--set", "quick_knn=false"]) == 0
    argv = ["eval", str(out), "--protocol", "multilayer,attentive", "--multilayer-blocks", "2", "--multilayer-epochs", "2", "--attentive-epochs", "2"]
    assert main(argv) == 0
    rows = read_rows(out.parent / "results.jsonl")
    assert [r["protocol"]["name"] for r in rows] == ["multilayer", "attentive"]
    ml, att = rows
    assert {"multilayer_top1", "multilayer_top5", "multilayer_val_top1"} == set(ml["metrics"])
    p = ml["protocol"]
    assert p["n_blocks"] == 2 and p["layers"] == "last 2 stages, each global-average-pooled" and p["feature_dim"] == 32 + 64
    assert (p["best_lr"], p["best_wd"]) in [(lr, wd) for lr in p["lr_grid"] for wd in p["wd_grid"]]
    assert len(p["grid_val_top1"]) == len(p["lr_grid"]) * len(p["wd_grid"])
    assert {"attentive_top1", "attentive_top5"} == set(att["metrics"])
    q = att["protocol"]
    assert (q["heads"], q["epochs"], q["optimizer"], q["lr"], q["weight_decay"]) == (1, 2, "adamw", 1e-3, 1e-3)
    assert q["tokens"].startswith("last stage's spatial positions: ")
    capsys.readouterr()
    assert main(["list", "protocols"]) == 0
    listed = capsys.readouterr().out
    assert "multilayer" in listed and "attentive" in listed and "V-JEPA attentive probe" in listed
    # the memory bound is one line, before anything is extracted (the images, 1.0 MB, fit; their tokens, 1.8 MB, do not)
    assert main(["eval", str(out), "--protocol", "attentive", "--max-memory-gb", "0.0015"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "attentive: caching the tokens of" in err[0] and "--max-memory-gb" in err[0]
