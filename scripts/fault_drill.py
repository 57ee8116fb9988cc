"""Fault drill: every failure a long run meets, against tiny real runs, end to end.

    python3 scripts/fault_drill.py [--keep DIR]

Each case runs `python3 -m bow_jax.main --config=configs/demo.py` (ResNet width 4, 512 digits,
batch 16) or, for the 2-process cases, tests/fault_worker.py (jax.distributed on loopback, gloo)
as subprocesses, injects the fault, and checks what a user would see: exit status, the message,
the checkpoints left. Prints a markdown table: case | expected | observed | ok. About 8 minutes
on 2 CPU cores. Exit status 1 when any case fails.
"""
import argparse
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3",
       "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
TINY = ["--config=configs/demo.py", "--config.model.kwargs.width=4", "--config.data.limit=512",
        "--config.batch_size=16", "--config.eval.after_training=False", "--config.log_every=2",
        "--config.checkpoint_every_steps=4", "--config.num_train_steps=8"]


def main_cmd(workdir, *overrides):
    return [sys.executable, "-m", "bow_jax.main", f"--workdir={workdir}", *TINY, *overrides]


def run(cmd, timeout=300):
    """(returncode, stdout + stderr, seconds)."""
    start = time.time()
    done = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=timeout, check=False)
    return done.returncode, done.stdout + done.stderr, time.time() - start


def steps(workdir):
    folder = os.path.join(workdir, "checkpoints")
    return sorted(int(d) for d in os.listdir(folder) if d.isdigit())


def line_with(text, word):
    """The first output line containing `word`, shortened around it for the table."""
    for line in text.splitlines():
        if word in line:
            start = max(0, line.index(word) - 60)
            return ("..." if start else "") + line[start:start + 170].strip().replace("|", "/")
    return f"(no line with {word!r})"


def copy(good, root, name):
    target = os.path.join(root, name)
    shutil.copytree(good, target)
    return target


def case_nan(good, root):
    wd = copy(good, root, "nan")
    rc, out, _ = run(main_cmd(wd, "--config.optim.lr=1e8", "--config.num_train_steps=24",
                              "--config.keep_checkpoints=2"))
    kept = steps(wd)
    ok = rc != 0 and "NaN or infinity" in out and "config.optim.lr" in out and max(kept) <= 8
    return ("1 NaN loss (lr=1e8, resumed over a good 8-step run, keep 2)",
            "exit != 0, NonFiniteError naming step, terms, config.optim.lr; good checkpoints kept",
            f"exit {rc}; `{line_with(out, 'NaN or infinity')}`; kept {kept}", ok)


def case_corrupt(good, root):
    wd = copy(good, root, "corrupt")
    files = glob.glob(os.path.join(wd, "checkpoints", "8", "state", "ocdbt.process_0", "d", "*"))
    path = max(files, key=os.path.getsize)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        f.write(np.random.default_rng(0).bytes(1024))
    rc, out, _ = run(main_cmd(wd))
    aside = [os.path.basename(p) for p in glob.glob(os.path.join(wd, "checkpoints", "corrupt-*"))]
    warned = line_with(out, "skipping checkpoint")
    ok = rc == 0 and "checkpoints/8" in warned and steps(wd) == [4, 8] and aside
    return ("2 1 KiB of random bytes in step 8's largest data file",
            "warning naming the folder; resume from 4; folder moved aside; step 8 saved again",
            f"exit {rc}; `{warned}`; kept {steps(wd)}, aside {aside}", ok)


def case_incomplete(good, root):
    wd = copy(good, root, "incomplete")
    os.makedirs(os.path.join(wd, "checkpoints", "12"))
    rc, out, _ = run(main_cmd(wd))
    ok = rc == 0 and "checkpoints/12 is incomplete" in out
    return ("3 empty checkpoints/12 beside good steps", "warning naming the folder; resume from 8",
            f"exit {rc}; `{line_with(out, 'is incomplete')}`", ok)


def case_lock(root):
    wd = os.path.join(root, "lock")
    first = subprocess.Popen(main_cmd(wd, "--config.num_train_steps=100000"), cwd=REPO, env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not os.path.exists(os.path.join(wd, "metrics.jsonl")):
            time.sleep(0.5)
        rc, out, seconds = run(main_cmd(wd), timeout=120)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    rc_after, _, _ = run(main_cmd(wd, "--config.num_train_steps=2"), timeout=300)
    ok = rc != 0 and "is in use" in out and rc_after == 0
    return ("4 a second run in the same workdir; then the first SIGKILLed",
            "second fails at once naming workdir and holder; after the kill a restart runs",
            f"exit {rc} after {seconds:.0f} s: `{line_with(out, 'is in use')}`; restart exit "
            f"{rc_after}", ok)


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_two(workdir, mode, timeout=300):
    """([rc0, rc1], [out0, out1], [exit times]) of tests/fault_worker.py as processes 0, 1."""
    env = {**ENV, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, os.path.join(REPO, "tests", "fault_worker.py"),
                               str(i), str(port), workdir, mode], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs, exited = [], []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
            exited.append(time.time())
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        return [None, None], ["hang", "hang"], [0, 0]
    return [p.returncode for p in procs], outs, exited


def case_agreed_stop(root):
    wd = os.path.join(root, "stop")
    os.makedirs(wd)
    rcs, outs, _ = run_two(wd, "term1")
    saved = steps(wd) if os.path.isdir(os.path.join(wd, "checkpoints")) else []
    rcs2, outs2, _ = run_two(wd, "train")
    ok = (rcs == [0, 0] and saved == [2] and rcs2 == [0, 0] and "RESULT 0 6" in outs2[0])
    return ("5 SIGTERM to process 1 of 2 (jax.distributed, gloo)",
            "both save the same step and exit 0; the same command resumes to the end",
            f"exits {rcs}, saved {saved}; `{line_with(outs[0], 'Stop requested')}`; resumed: "
            f"exits {rcs2}, `{line_with(outs2[0], 'RESULT')}`", ok)


def case_dead_peer(root):
    wd = os.path.join(root, "dead")
    os.makedirs(wd)
    rcs, outs, exited = run_two(wd, "kill1", timeout=240)
    killed = (float(outs[1].split("KILLED 1 at ")[1].split()[0])
              if "KILLED 1 at" in outs[1] else float("nan"))
    after = exited[0] - killed
    ok = rcs[0] not in (0, None) and after < 40
    return ("SIGKILL to process 1 of 2", "process 0 exits non-zero, clear error, bounded time "
            "(heartbeat 10 s)", f"process 0 exit {rcs[0]} {after:.0f} s after the kill: "
            f"`{line_with(outs[0], 'Terminating process')}`", ok)


def case_stop_latency(root):
    """SIGTERM while training the demo's own size (OBoW, width 16, batch 32); time to a committed save."""
    wd = os.path.join(root, "latency")
    cmd = [sys.executable, "-m", "bow_jax.main", f"--workdir={wd}", "--config=configs/demo.py",
           "--config.eval.after_training=False", "--config.num_train_steps=100000",
           "--config.log_every=10"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    metrics = os.path.join(wd, "metrics.jsonl")
    deadline = time.time() + 240
    while time.time() < deadline and not (os.path.exists(metrics) and os.path.getsize(metrics)):
        time.sleep(0.2)
    time.sleep(3)  # well into steady training
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=120)
    seconds = time.time() - sent
    saved = steps(wd) if os.path.isdir(os.path.join(wd, "checkpoints")) else []
    commit = (os.path.getmtime(os.path.join(wd, "checkpoints", str(saved[-1]),
                                            "commit_success.txt")) - sent if saved else -1)
    ok = rc == 0 and saved and commit < 10
    return ("6 SIGTERM during the demo (OBoW, width 16, batch 32)",
            "checkpoint committed within a few seconds (run-ahead <= 2 steps), exit 0",
            f"step {saved} committed {commit:.1f} s after the signal; exit {rc} after "
            f"{seconds:.1f} s", ok)


OBOW_SAVE = """
import runpy, sys
from bow_jax.tasks import common
c = runpy.run_path('configs/obow_cifar10_cpu.py')['get_config']()
c.update_from_flattened_dict({'data.source': 'digits', 'data.limit': 256, 'batch_size': 16,
                              'data.image_size': 32,
                              'model.kwargs.width': 4, 'obow.num_words': 32})
with common.restore(c, sys.argv[1]) as r:
    r.checkpointer.save(0, r.state, c)
"""


def case_shape(root):
    wd = os.path.join(root, "obow")
    rc0, out0, _ = run([sys.executable, "-c", OBOW_SAVE, wd])
    rc, out, _ = run([sys.executable, "-m", "bow_jax.main", f"--workdir={wd}",
                      "--config=configs/obow_cifar10_cpu.py", "--config.data.source=digits",
                      "--config.data.limit=256", "--config.batch_size=16", "--config.data.image_size=32",
                      "--config.model.kwargs.width=4", "--config.obow.num_words=64",
                      "--config.eval.after_training=False"])
    ok = rc0 == 0 and rc != 0 and "config.obow.num_words: 32 -> 64" in out
    return ("7 OBoW resumed with another config.obow.num_words",
            "error naming config.obow.num_words", f"exit {rc}: `{line_with(out, 'num_words')}`"
            + ("" if rc0 == 0 else f" (setup failed: {out0[-300:]})"), ok)


def case_disk_full(root):
    """Room for one checkpoint of the tiny run, not two (a tmpfs; needs root)."""
    mnt = os.path.join(root, "full")
    os.makedirs(mnt)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1400k", "tmpfs", mnt],
                      capture_output=True, check=False).returncode:
        return ("8 disk full during a checkpoint save", "(skipped: mount needs root)", "-", True)
    try:
        wd = os.path.join(mnt, "run")
        rc, out, _ = run(main_cmd(wd, "--config.num_train_steps=4", "--config.checkpoint_every_steps=2"))
        kept = steps(wd)
        subprocess.run(["mount", "-o", "remount,size=8m", mnt], check=False)
        rc2, _, _ = run(main_cmd(wd, "--config.num_train_steps=4", "--config.checkpoint_every_steps=2"))
        error = [line for line in out.splitlines() if line.startswith("error:")]
        ok = (rc == 1 and len(error) == 1 and "No space left on device" in error[0]
              and out.rstrip().splitlines()[-1].startswith("error:") and "step 4/" not in out
              and kept == [2] and rc2 == 0 and steps(wd) == [2, 4])
        return ("8 disk full during a checkpoint save (tmpfs with room for one)",
                "exit 1, one last `error:` line naming the folder and 'No space left on device'; "
                "older step kept; resumes once there is room",
                f"exit {rc}, {len(out.splitlines())} lines: `{line_with(out, 'error:')}`; kept "
                f"{kept}; after room: exit {rc2}, {steps(wd)}", ok)
    finally:
        subprocess.run(["umount", mnt], check=False)


def _images(root, classes=("a", "b"), per_class=6):
    from PIL import Image  # pylint: disable=import-outside-toplevel  # only the image cases
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in classes:
            os.makedirs(os.path.join(root, split, name), exist_ok=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), np.uint8)).save(
                    os.path.join(root, split, name, f"{i}.png"))
    return root


IMAGES = ["--config.data.source=image_folder", "--config.data.image_size=32",
          "--config.data.limit=0"]


def case_multiline(root):
    data = _images(os.path.join(root, "undecodable"))
    bad = os.path.join(data, "train", "b", "broken.png")
    with open(bad, "wb") as f:
        f.write(b"not a png")
    rc, out, _ = run(main_cmd(os.path.join(root, "ml"), *IMAGES, f"--config.data.path={data}"))
    error = out[out.find("error:"):].splitlines()
    ok = rc == 1 and "Traceback" not in out and any(bad in line for line in error[1:])
    return ("9 1 undecodable image in 12 (a multi-line error)",
            "exit 1, `error:` and every line of the message (the file named), no traceback",
            f"exit {rc}, {len(error)} error lines: `{line_with(out, 'error:')}` / "
            f"`{line_with(out, 'broken.png')}`", ok)


def case_symlink_loop(root):
    data = _images(os.path.join(root, "loop"))
    os.symlink("..", os.path.join(data, "train", "a", "loop"))
    rc, out, seconds = run(main_cmd(os.path.join(root, "loopwd"), *IMAGES,
                                    f"--config.data.path={data}", "--config.batch_size=8"),
                           timeout=120)
    ok = rc == 0 and "Traceback" not in out and "symbolic link not followed" in out
    return ("10 a symlink loop in an image folder (train/a/loop -> ..), 12 images",
            "no hang: trains on the 12 images, one warning naming the link",
            f"exit {rc} after {seconds:.0f} s: `{line_with(out, 'symbolic link')}`", ok)


def case_crop_scale(root):
    rc, out, _ = run(main_cmd(os.path.join(root, "crop"), "--config.obow.crop_scale=(0.5)"))
    ok = rc in (1, 2) and "Traceback" not in out and "config.obow.crop_scale" in out
    return ("11 --config.obow.crop_scale=(0.5) (a number, not a pair)",
            "one `error:` naming config.obow.crop_scale", f"exit {rc}: "
            f"`{line_with(out, 'crop_scale')}`", ok)


def case_other_batch(good, root):
    wd = copy(good, root, "batch")
    rc, out, _ = run(main_cmd(wd, "--config.batch_size=32", "--config.num_train_steps=12"))
    warned = "warning: resuming step" in out and "config.batch_size 16 -> 32" in out
    ok = rc == 0 and "Traceback" not in out and warned
    return ("12 resume with another --config.batch_size",
            "resumes, with a warning naming config.batch_size and what changes in the data order",
            f"exit {rc}: `{line_with(out, 'config.batch_size 16 -> 32')}`", ok)


def case_evaluate_3_devices(root):
    wd = os.path.join(root, "obow128")
    rc0, out0, _ = run([sys.executable, "-c", OBOW_SAVE.replace("'obow.num_words': 32",
                                                                  "'obow.num_words': 128"), wd])
    env = {**ENV, "XLA_FLAGS": "--xla_force_host_platform_device_count=3"}
    start = time.time()
    done = subprocess.run([sys.executable, "-m", "bow_jax.main", f"--workdir={wd}",
                           "--config=configs/obow_cifar10_cpu.py", "--config.task=evaluate",
                           "--config.data.source=digits", "--config.data.limit=256",
                           "--config.batch_size=16", "--config.data.image_size=32",
                           "--config.model.kwargs.width=4", "--config.obow.num_words=128",
                           "--config.eval.batch_size=255",  # 256 (default) needs 3 x k
                           "--config.eval.fewshot_shots=(1,5)"],  # 50-shot: too few digits
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    rc, out = done.returncode, done.stdout + done.stderr
    ok = rc0 == 0 and rc == 0 and "Traceback" not in out and "3 cpu device(s)" in out
    seconds = time.time() - start
    return ("13 evaluate an OBoW run (num_words=128, batch 16) on 3 devices",
            "evaluates: no training check (16 over 3 devices, 128 words) applies to evaluation",
            f"exit {rc} after {seconds:.0f} s: `{line_with(out, 'error:' if rc else 'done')}`"
            + ("" if rc0 == 0 else f" (setup failed: {out0[-300:]})"), ok)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="1,2,3,4,5,death,6,7,8,9,10,11,12,13",
                        help="comma-separated subset of the cases to run")
    parser.add_argument("--keep", default="", help="folder for the runs (default: a temporary "
                        "one, removed at the end)")
    args = parser.parse_args()
    root = args.keep or tempfile.mkdtemp(prefix="fault_drill_")
    os.makedirs(root, exist_ok=True)
    start = time.time()
    good = os.path.join(root, "good")
    rc, out, _ = run(main_cmd(good))
    if rc != 0 or steps(good) != [4, 8]:
        sys.exit(f"The good run failed (exit {rc}):\n{out[-3000:]}")
    rows = []
    cases = {"1": lambda: case_nan(good, root), "2": lambda: case_corrupt(good, root),
             "3": lambda: case_incomplete(good, root), "4": lambda: case_lock(root),
             "5": lambda: case_agreed_stop(root), "death": lambda: case_dead_peer(root),
             "6": lambda: case_stop_latency(root), "7": lambda: case_shape(root),
             "8": lambda: case_disk_full(root), "9": lambda: case_multiline(root),
             "10": lambda: case_symlink_loop(root), "11": lambda: case_crop_scale(root),
             "12": lambda: case_other_batch(good, root),
             "13": lambda: case_evaluate_3_devices(root)}
    for name in args.cases.split(","):
        rows.append(cases[name]())
        print(f"[{time.time() - start:.0f} s] {rows[-1][0]}: {'ok' if rows[-1][3] else 'FAILED'}",
              file=sys.stderr, flush=True)
    print("| case | expected | observed | ok |\n| --- | --- | --- | --- |")
    for name, expected, observed, ok in rows:
        print(f"| {name} | {expected} | {observed} | {'yes' if ok else '**no**'} |")
    print(f"\n{len(rows)} cases, {time.time() - start:.0f} s in all.")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    sys.exit(0 if all(r[3] for r in rows) else 1)


if __name__ == "__main__":
    main()
