"""`glr init` with model.pretrained and no network: one line, exit status 2, at once.

No test here touches the network: sockets are disabled for the whole module, the Hugging Face
cache is an empty (or hand-filled) temporary folder, and "no network" is either the hub's
offline mode or an HTTP client whose transport raises the connection error the hub sees when
name resolution fails.
"""

from __future__ import annotations

import io
import logging
import socket
from pathlib import Path

import httpx2
import huggingface_hub
import pytest
import timm
import torch
import yaml
from huggingface_hub import constants
from huggingface_hub.utils import http_backoff
from huggingface_hub.utils._http import default_client_factory
from safetensors.torch import save_file

from glr import cli
from glr.model.folder import load_model

BACKBONE = "resnet10t"
HUB_ID = "timm/resnet10t.c3_in1k"  # timm's default weights of resnet10t
WAY_OUT = ("model.weights_dir", f"{BACKBONE}.pth", "HF_HUB_OFFLINE=1")


@pytest.fixture(autouse=True)
def no_sockets(monkeypatch):
    """Any attempt to resolve a name or open a connection fails at once, and is recorded."""
    attempts: list[str] = []

    def refuse(name):
        def refused(*args, **kwargs):
            attempts.append(name)
            raise OSError(f"test: {name} is disabled (no network in tests)")
        return refused

    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    monkeypatch.setattr(socket, "create_connection", refuse("create_connection"))
    monkeypatch.setattr(socket.socket, "connect", refuse("connect"))
    yield attempts
    assert not attempts, f"a test tried to use the network: {attempts}"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache (env for subprocesses, constants for this process)."""
    home = tmp_path / "hf"
    cache = home / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture
def offline(monkeypatch, hub_cache):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hub_cache


@pytest.fixture
def unreachable_hub(monkeypatch, hub_cache):
    """Not offline, but every request of the hub fails as without a network (DNS failure)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    requests: list[str] = []

    def no_network(request: httpx2.Request) -> httpx2.Response:
        requests.append(f"{request.method} {request.url}")
        raise httpx2.ConnectError("[Errno -3] Temporary failure in name resolution",
                                  request=request)

    huggingface_hub.set_client_factory(
        lambda: httpx2.Client(transport=httpx2.MockTransport(no_network)))
    yield requests
    huggingface_hub.set_client_factory(default_client_factory)


def write_params(path: Path, **model) -> Path:
    raw = {"model": {"backbones": [BACKBONE], "size": 32, "embedding_dim": 16,
                     "pretrained": True, "pretrained_source": "timm", **model},
           "train": {"phases": {"p1": {}},
                     "recipe": {f"{BACKBONE}-p1": {"backbone": BACKBONE, "phase": "p1"}}}}
    path.write_text(yaml.safe_dump(raw))
    return path


def run_init(tmp_path: Path, params: Path, backbone: str = BACKBONE) -> int:
    return cli.main(["init", "--backbone", backbone, "--params", str(params),
                     "--models", str(tmp_path / "models")])


def output_lines(capfd, caplog) -> list[str]:
    """Every line written to stdout/stderr plus every log record's message."""
    captured = capfd.readouterr()
    lines = [line for line in (captured.out + captured.err).splitlines() if line.strip()]
    return lines + [record.getMessage() for record in caplog.records]


def assert_one_error_line(capfd, caplog, *needles: str) -> str:
    lines = output_lines(capfd, caplog)
    assert len(lines) == len(set(lines)), f"a line was printed twice: {lines}"
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    (error,) = errors
    assert "\n" not in error
    for needle in needles:
        assert needle in error, (needle, error)
    return error


# --------------------------------------------------------------------------- failing fast


def test_offline_without_cached_weights_is_one_line(tmp_path, offline, capfd, caplog):
    caplog.set_level(logging.INFO)
    assert run_init(tmp_path, write_params(tmp_path / "params.yaml")) == 2
    error = assert_one_error_line(capfd, caplog, "model.pretrained", "could not be fetched",
                                  "HF_HUB_OFFLINE is set", str(offline), *WAY_OUT)
    assert HUB_ID in error
    assert not (tmp_path / "models").exists()


def test_unreachable_hub_is_one_line_after_one_request(tmp_path, unreachable_hub, capfd,
                                                        caplog):
    caplog.set_level(logging.INFO)
    assert run_init(tmp_path, write_params(tmp_path / "params.yaml")) == 2
    assert_one_error_line(capfd, caplog, "model.pretrained", "could not be fetched",
                          "ConnectError", "Temporary failure in name resolution", *WAY_OUT)
    # One HEAD for the weights, no retries: the hub alone would try 2 files x 6 times, with
    # 23 s of sleeps each. (The hub may also ask for its agent registry: not a weights file.)
    weights_requests = [r for r in unreachable_hub if "/resolve/" in r]
    assert weights_requests == [f"HEAD https://huggingface.co/{HUB_ID}/resolve/main/"
                                "model.safetensors"], unreachable_hub
    assert not (tmp_path / "models").exists()


def test_hub_warnings_are_printed_once(tmp_path, unreachable_hub, monkeypatch):
    """huggingface_hub's own handler plus propagation to a configured root logger printed each
    hub warning twice; after `glr init` has used the hub, a hub warning is one line."""
    stream = io.StringIO()
    hub_logger = logging.getLogger("huggingface_hub")
    # The state huggingface_hub leaves on import: its own stderr handler, propagating to root.
    monkeypatch.setattr(hub_logger, "handlers", [logging.StreamHandler(stream)])
    monkeypatch.setattr(hub_logger, "propagate", True)
    monkeypatch.setattr(logging.root, "handlers", [*logging.root.handlers,
                                                   logging.StreamHandler(stream)])
    assert run_init(tmp_path, write_params(tmp_path / "params.yaml")) == 2
    with pytest.raises(httpx2.ConnectError):
        http_backoff("HEAD", "https://huggingface.co/timm/x", max_retries=0)
    lines = stream.getvalue().splitlines()
    hub_lines = [line for line in lines if "thrown while requesting HEAD" in line]
    assert len(hub_lines) == 1, lines
    assert len(lines) == len(set(lines)), lines


def test_backbone_not_in_params_is_one_line(tmp_path, offline, capfd, caplog):
    params = write_params(tmp_path / "params.yaml", pretrained=False)
    assert run_init(tmp_path, params, backbone="resnet18") == 2
    assert_one_error_line(capfd, caplog, "--backbone resnet18", "model.backbones", BACKBONE)


def test_missing_weights_file_without_fallback_is_one_line(tmp_path, offline, capfd, caplog):
    params = write_params(tmp_path / "params.yaml", pretrained=False,
                          weights_dir=str(tmp_path / "weights"))
    assert run_init(tmp_path, params) == 2
    assert_one_error_line(capfd, caplog, "model.weights_dir",
                          str(tmp_path / "weights" / f"{BACKBONE}.pth"))


# --------------------------------------------------------------------------- the ways out


def imagenet_like_weights() -> dict[str, torch.Tensor]:
    """A resnet10t state dict as timm publishes it (with the classifier), seeded."""
    torch.manual_seed(7)
    model = timm.create_model(BACKBONE, pretrained=False)
    return {key: value.contiguous() for key, value in model.state_dict().items()}


def started_from(tmp_path: Path, weights: dict[str, torch.Tensor]) -> bool:
    model, _ = load_model(tmp_path / "models" / BACKBONE / "pretrained")
    # conv1 of the stem is not touched by the last-stride change, so it must equal the file's.
    return torch.equal(model.backbone.state_dict()["conv1.0.weight"], weights["conv1.0.weight"])


def test_offline_with_a_prefilled_hub_cache(tmp_path, offline, capfd, caplog):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = offline / f"models--{HUB_ID.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    weights = imagenet_like_weights()
    save_file(weights, str(repo / "snapshots" / commit / "model.safetensors"))
    caplog.set_level(logging.INFO)
    assert run_init(tmp_path, write_params(tmp_path / "params.yaml")) == 0
    assert started_from(tmp_path, weights)
    lines = output_lines(capfd, caplog)
    assert len(lines) == len(set(lines)), lines


def test_offline_with_a_weights_dir(tmp_path, offline):
    weights = imagenet_like_weights()
    (tmp_path / "weights").mkdir()
    torch.save(weights, tmp_path / "weights" / f"{BACKBONE}.pth")
    params = write_params(tmp_path / "params.yaml", weights_dir=str(tmp_path / "weights"))
    assert run_init(tmp_path, params) == 0
    assert started_from(tmp_path, weights)
