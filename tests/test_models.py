"""Base models (WRN-40-2, ResNet-50, Normalize) and checkpoints (dssn_kernels.workflow.checkpoint)."""
import pytest
import torch

import dssn_kernels as dk
from dssn_kernels.workflow.checkpoint import (CheckpointError, SmoothingSpec, SpecMismatchError,
                                     build_model, load_checkpoint, read_checkpoint,
                                     save_checkpoint)
from dssn_kernels.workflow.models import (Normalize, ResNet, SmallCNN, WideResNet,
                                 convert_released_state_dict, normalized, resnet50, wrn40_2)


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_wrn40_2_is_the_standard_model():
    torch.manual_seed(0)
    m = wrn40_2(10).eval()
    assert n_params(m) == 2_243_546          # WRN-40-2 on CIFAR-10: 2.2M parameters
    sd = m.state_dict()
    # the key names of the implementation Yang et al. / Levine & Feizi build on
    for k in ("conv1.weight", "block1.layer.0.bn1.running_var", "block1.layer.0.convShortcut.weight",
              "block2.layer.0.convShortcut.weight", "block3.layer.5.conv2.weight",
              "bn1.weight", "fc.weight", "fc.bias"):
        assert k in sd, k
    assert "block1.layer.1.convShortcut.weight" not in sd
    assert sum(k.endswith("conv2.weight") for k in sd) == 18          # 3 groups x 6 blocks
    assert m(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    assert WideResNet(depth=10, widen_factor=1, num_classes=4, in_channels=1)(
        torch.rand(1, 1, 8, 8)).shape == (1, 4)
    with pytest.raises(ValueError, match="6n"):
        WideResNet(depth=41)


def _torchvision_resnet50_keys():
    """The state_dict keys torchvision's resnet50 has, written out from its structure."""
    keys = []

    def bn(p):
        keys.extend(f"{p}.{s}" for s in ("weight", "bias", "running_mean", "running_var",
                                         "num_batches_tracked"))
    keys.append("conv1.weight")
    bn("bn1")
    for layer, blocks in enumerate((3, 4, 6, 3), start=1):
        for b in range(blocks):
            p = f"layer{layer}.{b}"
            for i in (1, 2, 3):
                keys.append(f"{p}.conv{i}.weight")
                bn(f"{p}.bn{i}")
            if b == 0:
                keys.append(f"{p}.downsample.0.weight")
                bn(f"{p}.downsample.1")
    keys += ["fc.weight", "fc.bias"]
    return keys


def test_resnet50_has_torchvisions_state_dict_layout():
    m = resnet50(1000, use_torchvision=False)
    assert isinstance(m, ResNet)
    assert n_params(m) == 25_557_032           # torchvision resnet50: 25,557,032
    sd = m.state_dict()
    assert list(sd) == _torchvision_resnet50_keys()
    assert sd["layer2.0.downsample.0.weight"].shape == (512, 256, 1, 1)
    assert sd["layer4.2.conv2.weight"].shape == (512, 512, 3, 3)
    assert sd["fc.weight"].shape == (1000, 2048)
    small = resnet50(5, use_torchvision=False).eval()
    assert small(torch.rand(1, 3, 64, 64)).shape == (1, 5)
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return
    tv = resnet50(1000, use_torchvision=True).state_dict()
    assert [(k, tuple(v.shape)) for k, v in tv.items()] == [(k, tuple(v.shape)) for k, v in sd.items()]


def test_normalize_and_released_state_dicts():
    norm = Normalize((0.5, 0.25), (0.5, 0.25))
    x = torch.tensor([[[[1.0]], [[0.5]]]])
    assert torch.equal(norm(x), torch.tensor([[[[1.0]], [[1.0]]]]))
    with pytest.raises(ValueError):
        Normalize((0.5,), (0.0,))
    torch.manual_seed(0)
    net = normalized(WideResNet(depth=10, widen_factor=1, num_classes=3), (0.4914, 0.4822, 0.4465),
                     (0.2023, 0.1994, 0.2010)).eval()
    assert {"norm.mean", "norm.std", "model.fc.weight"} <= set(net.state_dict())
    # a state_dict in the released code's layout (DataParallel, mu / log_sig) loads
    released = {"norm.module.mu": net.norm.mean.reshape(3, 1, 1).clone(),
                "norm.module.log_sig": torch.log(net.norm.std).reshape(3, 1, 1)}
    released.update({f"model.module.{k[len('model.'):]}": v for k, v in net.state_dict().items()
                     if k.startswith("model.")})
    fresh = normalized(WideResNet(depth=10, widen_factor=1, num_classes=3), (0.5,) * 3, (1.0,) * 3)
    fresh.load_state_dict(convert_released_state_dict(released), strict=True)
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(fresh.eval()(x), net(x), atol=1e-5)


def _spec(**kw):
    base = dict(sigma=0.5, q=16, seed=0, input_shape=(1, 8, 8), num_classes=10)
    base.update(kw)
    return SmoothingSpec.create(**base)


def test_checkpoint_roundtrip_weights_only(tmp_path):
    torch.manual_seed(0)
    kwargs = {"num_classes": 10, "in_channels": 1, "image_size": 8, "width": 4, "hidden": 8}
    model = build_model("small_cnn", kwargs).eval()
    spec = _spec()
    path = save_checkpoint(tmp_path / "m.pt", model, arch="small_cnn", model_kwargs=kwargs,
                           spec=spec, dataset={"name": "digits", "split": "train"},
                           training={"torch": torch.__version__, "epochs": 1})
    raw = torch.load(path, weights_only=True)          # plain types only
    assert raw["format"] == "dssn-checkpoint/1"
    assert raw["spec"] == {"sigma": 0.5, "q": 16, "seed": 0, "L": 27,
                           "input_shape": [1, 8, 8], "num_classes": 10}
    assert raw["model"] == {"arch": "small_cnn", "kwargs": kwargs}
    loaded, spec2 = load_checkpoint(path)
    assert spec2 == spec and not loaded.training
    x = torch.randint(0, 17, (3, 1, 8, 8), dtype=torch.uint8)
    a = dk.certify(model, x, **spec.certify_kwargs())
    b = dk.certify(loaded, x, **spec2.certify_kwargs())
    assert torch.equal(a.counts, b.counts)
    # normalized architectures round-trip too
    wk = {"num_classes": 10, "in_channels": 3, "mean": [0.5] * 3, "std": [0.25] * 3}
    wrn = build_model("wrn40_2", wk)
    p2 = save_checkpoint(tmp_path / "w.pt", wrn, arch="wrn40_2", model_kwargs=wk,
                         spec=_spec(q=255, input_shape=(3, 32, 32)), dataset={"name": "cifar10"})
    m2, _ = load_checkpoint(p2)
    assert torch.equal(m2.norm.std, torch.full((3,), 0.25))


def test_checkpoint_refusals(tmp_path):
    p = tmp_path / "bad.pt"
    p.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="not a loadable dssn checkpoint"):
        read_checkpoint(p)
    with pytest.raises(CheckpointError, match="no checkpoint file"):
        read_checkpoint(tmp_path / "missing.pt")
    torch.save({"state_dict": {}}, p)
    with pytest.raises(CheckpointError, match="not a dssn checkpoint"):
        read_checkpoint(p)
    # arbitrary pickled objects are never unpickled (weights_only=True)
    torch.save({"format": "dssn-checkpoint/1", "evil": SmallCNN()}, p)
    with pytest.raises(CheckpointError, match="not a loadable"):
        read_checkpoint(p)
    # an inconsistent spec (L does not follow from sigma and q)
    good = _spec().to_dict()
    torch.save({"format": "dssn-checkpoint/1", "model": {"arch": "small_cnn", "kwargs": {}},
                "spec": dict(good, L=30), "dataset": {}, "state_dict": {}}, p)
    with pytest.raises(CheckpointError, match="L = int"):
        read_checkpoint(p)


def test_spec_agreement():
    spec = _spec()
    spec.check_agrees()
    spec.check_agrees(sigma=0.5, q=16, seed=0, lam=0.5 / 3 ** -0.5)
    with pytest.raises(SpecMismatchError, match=r"--sigma 0.25 .*sigma=0.5"):
        spec.check_agrees(sigma=0.25)
    with pytest.raises(SpecMismatchError, match=r"--q 255 .*q=16"):
        spec.check_agrees(q=255)
    with pytest.raises(SpecMismatchError, match=r"--seed 3 .*seed=0"):
        spec.check_agrees(seed=3)
    with pytest.raises(SpecMismatchError, match=r"--lam 1 .*lam=0.866"):
        spec.check_agrees(lam=1.0)
    lam_spec = SmoothingSpec.create(lam=0.75, q=16, input_shape=(1, 8, 8), num_classes=10)
    assert lam_spec.L == 24 and lam_spec.to_dict()["lam"] == 0.75
    lam_spec.check_agrees(lam=0.75, sigma=0.75 * 3 ** -0.5)


def test_checkpoint_writes_replace_atomically_and_read_hashes_what_it_loads(tmp_path,
                                                                             monkeypatch):
    """save_checkpoint writes through a new, unique temporary file: a user's file named
    like a fixed temporary (m.pt.tmp) is never touched, an interrupted save leaves the old
    checkpoint whole and no temporary file; read_checkpoint's sha256 is the digest of the
    very bytes it loaded."""
    import hashlib

    from dssn_kernels.workflow import checkpoint as ckpt_mod

    kwargs = {"num_classes": 10, "in_channels": 1, "image_size": 8, "width": 4, "hidden": 8}
    model = build_model("small_cnn", kwargs).eval()
    save = lambda: save_checkpoint(tmp_path / "m.pt", model, arch="small_cnn",  # noqa: E731
                                   model_kwargs=kwargs, spec=_spec(), dataset={"name": "digits"})
    users = tmp_path / "m.pt.tmp"
    users.write_bytes(b"the user's own file")
    save()
    first = (tmp_path / "m.pt").read_bytes()
    assert users.read_bytes() == b"the user's own file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt", "m.pt.tmp"]
    ckpt = read_checkpoint(tmp_path / "m.pt")
    assert ckpt["sha256"] == hashlib.sha256(first).hexdigest()

    def interrupted(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt_mod.torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save()
    assert (tmp_path / "m.pt").read_bytes() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt", "m.pt.tmp"]
