"""`pg-edge serve` as a command, called as the README shows: its curl commands and its
openai-client snippet run against the real server process (with a free port and 8 tokens
instead of 8080 and 32)."""
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import pg_edge

ROOT = Path(__file__).resolve().parents[2]


def readme_block(lang: str, marker: str) -> str:
    blocks = re.findall(rf"```{lang}\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    (block,) = [b for b in blocks if marker in b]
    return block


@pytest.fixture
def served(converted, tmp_path, _sample_images_cache):
    """The README's `pg-edge serve pg2-3b-224 --port 8080`, on a free port: (port, folder)."""
    (tmp_path / "pg2-3b-224").symlink_to(converted(version=1))
    _sample_images_cache["chelsea"].resize((90, 60)).save(tmp_path / "cat.jpg")
    command = readme_block("bash", "pg-edge serve").split("#")[0].split()
    assert command[:3] == ["pg-edge", "serve", "pg2-3b-224"] and command[-2:] == ["--port", "8080"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "pg_edge.cli", *command[1:-1], "0"], cwd=tmp_path, env=env,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        port = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        assert port and "pg2-3b-224" in line, line
        yield port.group(1), tmp_path, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_readme_curl_and_openai_snippets(served, converted):
    port, folder, proc = served
    pg = pg_edge.load(converted(version=1))
    caption = pg.generate(folder / "cat.jpg", "caption en", max_tokens=8).text
    short = {"8080": port, '"max_tokens": 32': '"max_tokens": 8', "max_tokens=32": "max_tokens=8"}

    curl = readme_block("bash", "curl")
    for a, b in short.items():
        curl = curl.replace(a, b)
    out = subprocess.run(["bash", "-c", curl], cwd=folder, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    decoder, docs, at = json.JSONDecoder(), [], 0
    while at < len(out.stdout):  # curl prints the two JSON bodies back to back
        doc, at = decoder.raw_decode(out.stdout, at)
        docs.append(doc)
    chat, detect = docs
    assert chat["object"] == "chat.completion" and chat["choices"][0]["message"]["content"] == caption
    assert detect["task"] == "detect" and detect["prompt"] == "detect cat ; dog"

    snippet = readme_block("python", "from openai import OpenAI")
    for a, b in short.items():
        snippet = snippet.replace(a, b)
    out = subprocess.run([sys.executable, "-c", snippet], cwd=folder, capture_output=True, text=True,
                         timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.count(caption) == 2 and "completion_tokens=" in out.stdout

    proc.send_signal(signal.SIGINT)  # Ctrl-C: a clean stop
    assert proc.wait(timeout=20) == 0
    assert "stopped" in proc.stderr.read()


def test_other_hosts_need_an_api_key(capsys):
    from pg_edge.cli import main

    assert main(["serve", "no-such-model", "--host", "0.0.0.0"]) == 2
    assert "--api-key" in capsys.readouterr().err  # refused before any model is loaded


def test_serve_takes_the_attention_mode_and_refuses_others(capsys):
    """`--attention window|global` as on `pg-edge run` (PaliGemma 2 at 896 px); others: exit 2."""
    from pg_edge.cli import build_parser

    args = build_parser("serve").parse_args(["serve", "some-model", "--attention", "global"])
    assert args.attention == "global"
    assert build_parser("serve").parse_args(["serve", "some-model"]).attention == "window"
    with pytest.raises(SystemExit) as e:
        build_parser("serve").parse_args(["serve", "some-model", "--attention", "sideways"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err
