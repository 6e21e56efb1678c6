"""Fuzz: seeded mutations of safetensors shards, the index and config.json (tests/helpers/fuzz_cases.py),
each loaded in a subprocess (tests/helpers/fuzz_worker.py) so that a signal or a hang is caught.

Every case must end in a clean PgEdgeError or a correct load and forward pass; never a signal,
a hang, a traceback, or a shard accepted that the `safetensors` library refuses. Cases run in
batches (one interpreter per batch) to keep the whole test near 20 s.
"""
import os
import subprocess
import sys
from pathlib import Path

from fuzz_cases import make_base, make_cases

WORKER = Path(__file__).parents[1] / "helpers" / "fuzz_worker.py"
CASES, BATCH, SEED = 900, 300, 13
BATCH_TIMEOUT_S = 120  # a batch normally takes a few seconds; a FIFO that blocks would hang forever


def run_batch(cases):
    path = os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path)
    proc = subprocess.run([sys.executable, str(WORKER)], input="\n".join(str(d) for d, _ in cases),
                          capture_output=True, text=True, timeout=BATCH_TIMEOUT_S, env=env)
    started, ended, problems = None, {}, []
    for line in proc.stdout.splitlines():
        tag, i, *rest = line.split(" ", 2) + [""]
        i = int(i)
        if tag == "START":
            started = i
        else:
            ended[i] = tag
            if tag in ("BUG", "LAX"):
                problems.append(f"{tag} [{cases[i][1]}]: {rest[0]}")
    if proc.returncode != 0:
        culprit = cases[started][1] if started is not None else "?"
        problems.append(f"worker died with {proc.returncode} on [{culprit}]: {proc.stderr[-500:]}")
    return ended, problems


def test_mutated_model_files_load_or_fail_cleanly(tmp_path):
    base = make_base(tmp_path / "base")
    ended, problems = run_batch([(base, "unmodified")])
    assert ended == {0: "OK"}, problems  # the base folder itself loads and runs

    cases = make_cases(base, tmp_path / "cases", CASES, SEED)
    outcomes = {}
    for start in range(0, CASES, BATCH):
        batch = cases[start:start + BATCH]
        ended, batch_problems = run_batch(batch)
        problems += batch_problems
        outcomes.update({start + i: tag for i, tag in ended.items()})
    assert not problems, "\n".join(problems[:20])
    assert len(outcomes) == CASES  # every case reported an outcome
    tags = list(outcomes.values())
    # The mutations reach both outcomes: most are refused, some still load (swapped offsets,
    # flipped data bytes, harmless config values).
    assert tags.count("ERR") > CASES // 2 and tags.count("OK") > 10, {t: tags.count(t) for t in set(tags)}
