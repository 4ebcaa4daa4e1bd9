"""Tiny models, independent references, live servers and a headless browser shared by the tests."""

from __future__ import annotations

import math
import shutil
import threading
import time
from pathlib import Path

import torch

from minicpm import MiniCPMConfig, MiniCPMForCausalLM


def tiny_config(**overrides) -> MiniCPMConfig:
    fields = dict(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        rope_theta=1e6,
        rope_scaling={"type": "dynamic", "factor": 4.0},
        rms_norm_eps=1e-5,
        scale_emb=12,
        dim_model_base=16,
        scale_depth=1.4,
        tie_word_embeddings=False,
    )
    fields.update(overrides)
    return MiniCPMConfig(**fields)


def random_model(config: MiniCPMConfig, seed: int = 0) -> MiniCPMForCausalLM:
    """A model whose weights have the spread of a trained one (norm weights not all ones)."""
    torch.manual_seed(seed)
    model = MiniCPMForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * 0.08)
    return model.eval()


def reference_logits(config: MiniCPMConfig, state: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """The MiniCPM forward written out from the facts page, eager float32 math, nothing shared."""
    c = config
    sd = {k: v.float() for k, v in state.items()}
    L, H, KV, D = (
        c.num_hidden_layers,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.hidden_size // c.num_attention_heads,
    )
    b, s = ids.shape

    def norm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + c.rms_norm_eps) * w

    base = c.rope_theta
    if c.rope_scaling and c.rope_scaling["type"] == "dynamic" and s > c.max_position_embeddings:
        f = c.rope_scaling["factor"]
        base = base * ((f * s / c.max_position_embeddings) - (f - 1)) ** (D / (D - 2))
    inv = 1.0 / (base ** (torch.arange(0, D, 2).float() / D))
    t = torch.arange(s).float()
    if c.rope_scaling and c.rope_scaling["type"] == "linear":
        t = t / c.rope_scaling["factor"]
    emb = torch.cat([torch.outer(t, inv)] * 2, -1)
    cos, sin = emb.cos(), emb.sin()

    def rope(x):
        x1, x2 = x[..., : D // 2], x[..., D // 2 :]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    h = sd["model.embed_tokens.weight"][ids] * c.scale_emb
    causal = torch.full((s, s), float("-inf")).triu(1)
    for i in range(L):
        p = f"model.layers.{i}."
        x = norm(h, sd[p + "input_layernorm.weight"])
        q = (x @ sd[p + "self_attn.q_proj.weight"].T).view(b, s, H, D).transpose(1, 2)
        k = (x @ sd[p + "self_attn.k_proj.weight"].T).view(b, s, KV, D).transpose(1, 2)
        v = (x @ sd[p + "self_attn.v_proj.weight"].T).view(b, s, KV, D).transpose(1, 2)
        q, k = rope(q), rope(k)
        k, v = k.repeat_interleave(H // KV, 1), v.repeat_interleave(H // KV, 1)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D) + causal, -1) @ v
        att = att.transpose(1, 2).reshape(b, s, H * D) @ sd[p + "self_attn.o_proj.weight"].T
        h = h + att * (c.scale_depth / math.sqrt(L))
        x = norm(h, sd[p + "post_attention_layernorm.weight"])
        mlp = torch.nn.functional.silu(x @ sd[p + "mlp.gate_proj.weight"].T) * (x @ sd[p + "mlp.up_proj.weight"].T)
        h = h + (mlp @ sd[p + "mlp.down_proj.weight"].T) * (c.scale_depth / math.sqrt(L))
    head = sd.get("lm_head.weight", sd["model.embed_tokens.weight"])
    return (norm(h, sd["model.norm.weight"]) / (c.hidden_size / c.dim_model_base)) @ head.T


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> float:
    """max |a - e| / max |e| <= rel; returns the measured ratio."""
    err = (actual.float() - expected.float()).abs().max().item() / expected.float().abs().max().item()
    assert err <= rel, f"relative error {err:.3g} > {rel:.3g}"
    return err


class LiveServer:
    """A minicpm server (uvicorn, in a thread of this process) over a ServerState."""

    def __init__(self, state) -> None:
        import uvicorn

        from minicpm.server.app import build_app

        self.state = state
        config = uvicorn.Config(build_app(state), host="127.0.0.1", port=0, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not (self.server.started and self.server.servers) and time.monotonic() < deadline:
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.state.engine.close()


def serve_llm(llm, name: str, **fields) -> LiveServer:
    """A :class:`LiveServer` over ``llm``'s engine, serving it as ``name`` (``fields``: more
    :class:`~minicpm.server.app.ServerState` settings, e.g. ``api_keys``)."""
    from minicpm.engine.async_engine import BackgroundEngine
    from minicpm.server.app import ServerState

    state = ServerState(engine=BackgroundEngine(llm.engine), tokenizer=llm.tokenizer, served_names=[name], **fields)
    return LiveServer(state)


def serve_process(cache: Path, *flags: str):
    """``minicpm serve FLAGS`` (the default model from ``cache``) as a process of its own, once its
    ``/health`` answers; returns (process, base URL). Read its stderr with :func:`stop_process`."""
    import os
    import socket
    import subprocess
    import sys

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = Path(sys.executable).with_name("minicpm")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "minicpm.cli"]
    env = dict(os.environ, MINICPM_CACHE=str(cache))
    proc = subprocess.Popen([*cmd, "serve", "--port", str(port), *flags], env=env, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health").status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("the server did not start: " + proc.stderr.read().decode()[-2000:])


def stop_process(proc) -> str:
    """Kill ``proc`` if it still runs; its stderr."""
    if proc.poll() is None:
        proc.kill()
        proc.wait(30)
    return proc.stderr.read().decode()


CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def chromium_paths() -> tuple[str, str] | None:
    """Debian's headless Chromium and its chromedriver (apt: chromium chromium-driver), or None."""
    browser = next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)
    driver = "/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists() else shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def chromium(width: int = 1200, height: int = 900, dark: bool = False, phone: bool = False):
    """A selenium driver for headless Chromium (``--headless=new --no-sandbox``) with the browser's
    console log kept (``driver.get_log("browser")``) and network events in the performance log;
    ``phone``: a touch screen of ``width`` x ``height`` CSS pixels (a window cannot be that narrow)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    paths = chromium_paths()
    if paths is None:
        raise FileNotFoundError("headless Chromium is not installed (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = paths[0]
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run"):
        options.add_argument(arg)
    options.add_argument(f"--window-size={width},{height}")
    if phone:
        metrics = {"width": width, "height": height, "pixelRatio": 2, "touch": True}
        options.add_experimental_option("mobileEmulation", {"deviceMetrics": metrics})
    if dark:
        options.add_argument("--force-dark-mode")
        options.add_argument("--blink-settings=preferredColorScheme=0")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    return webdriver.Chrome(service=Service(paths[1]), options=options)
