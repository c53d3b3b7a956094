"""Training: the SSB loss, the resumable distributed batch stream, exact resume, the CLI, and DDP on gloo."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from ssb_fast.train.batches import ShuffledStream
from ssb_fast.train.loop import TrainConfig, train
from ssb_fast.train.loss import (
    area_ranks,
    draw,
    resolve_expert_labels,
    soft_dice,
    ssb_loss,
    with_area_rank_labels,
)
from typer.testing import CliRunner

from ssb_fast import load_model
from ssb_fast.bridge import Bridge
from ssb_fast.cli import app
from ssb_fast.data import write_synthetic
from ssb_fast.model import UNet, UNetConfig

runner = CliRunner()


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("data") / "synthetic", n_cases=48, size=32, seed=0)


def tiny_config(data, out, **kw):
    base = dict(data=str(data), out=str(out), preset="tiny", steps=20, batch_size=4, lr=2e-3, warmup_steps=5,
                log_every=5, save_every=10, val_every=0, seed=3, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def test_draw_picks_only_present_annotators_and_drops_labels():
    present = torch.tensor([[True, False, True, False]] * 4000)
    g = torch.Generator().manual_seed(0)
    d = draw(present, null_label=4, n_timesteps=1000, p_uncond=0.25, generator=g)
    assert set(d.annotator.tolist()) == {0, 2}
    null = d.label == 4
    assert abs(null.float().mean().item() - 0.25) < 0.03
    assert torch.equal(d.label[~null], d.annotator[~null])
    assert d.t.min() >= 0 and d.t.max() < 1000 and d.seeds.min() >= 0
    with pytest.raises(ValueError, match=r"batch items \[1\] have no present annotator"):
        draw(torch.tensor([[True, False], [False, False]]), 2, 1000, 0.1, g)


def test_area_ranks_order_present_masks_by_area_with_empty_and_absent_last():
    masks = torch.zeros(3, 4, 4, 4)
    masks[0, 0, :2] = 1      # area 8
    masks[0, 2] = 1          # 16
    masks[0, 3, 0, 0] = 1    # 1; slot 1 empty
    masks[1, 1, :1] = 1      # one marked reader, three empty ones
    masks[2, 2] = 1          # the largest mask, but its slot is absent
    present = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 1]], dtype=torch.bool)
    ranks = area_ranks(masks, present)
    assert ranks.tolist() == [[1, 3, 0, 2], [1, 0, 2, 3], [0, 1, 3, 2]]
    for row in ranks:  # a permutation of the slots
        assert sorted(row.tolist()) == [0, 1, 2, 3]


def test_area_rank_labels_replace_the_slot_but_keep_the_null_label():
    masks = torch.zeros(4, 4, 4, 4)
    for b in range(4):
        for m in range(4):
            masks[b, m, : m + 1] = 1  # slot m has area 4 (m + 1): slot 3 is the widest
    present = torch.ones(4, 4, dtype=torch.bool)
    d = draw(present, null_label=4, n_timesteps=1000, p_uncond=0.0, generator=torch.Generator().manual_seed(0))
    d.label[1] = 4  # as if dropped for CFG
    ranked = with_area_rank_labels(d, area_ranks(masks, present), null_label=4)
    expected = (3 - d.annotator).tolist()
    expected[1] = 4
    assert ranked.label.tolist() == expected
    assert torch.equal(ranked.annotator, d.annotator) and torch.equal(ranked.t, d.t)
    assert torch.equal(ranked.seeds, d.seeds)


def test_training_feeds_the_area_rank_or_the_slot_as_chosen(synthetic_dir, tmp_path, monkeypatch):
    """The label the U-Net sees in a training step is the rank of the drawn mask by area (area-rank) or its
    slot (slot); a run saved before the option existed resumes with slot labels."""
    import ssb_fast.train.loop as loop

    seen = []
    real_loss = loop.ssb_loss

    def spy(net, bridge, images, masks, sample, lambda_dice):
        present = torch.ones(masks.shape[:2], dtype=torch.bool)
        seen.append((sample.label.clone(), sample.annotator.clone(), area_ranks(masks, present)))
        return real_loss(net, bridge, images, masks, sample, lambda_dice)

    monkeypatch.setattr(loop, "ssb_loss", spy)
    for mode in ("area-rank", "slot"):
        seen.clear()
        train(tiny_config(synthetic_dir, tmp_path / mode, steps=3, p_uncond=0.0, expert_labels=mode),
              progress=False)
        for label, annotator, ranks in seen:
            want = ranks.gather(1, annotator.view(-1, 1)).flatten() if mode == "area-rank" else annotator
            assert torch.equal(label, want)
        assert any(not torch.equal(lab, ann) for lab, ann, _ in seen) or mode == "slot"
    assert TrainConfig.from_dict({"data": "d", "out": "o"}).expert_labels == "slot"
    assert TrainConfig(data="d", out="o").expert_labels == "auto"
    # auto: the synthetic data names its annotators (slot k is one style in every case); LIDC's are anonymous
    train(tiny_config(synthetic_dir, tmp_path / "auto", steps=1), progress=False)
    assert json.loads((tmp_path / "auto" / "config.json").read_text())["train"]["expert_labels"] == "slot"
    assert resolve_expert_labels("auto", {"name": "lidc-contours"}) == "area-rank"
    assert resolve_expert_labels("auto", None) == "area-rank"
    assert resolve_expert_labels("slot", {}) == "slot"
    with pytest.raises(ValueError, match="expert_labels must be one of auto, area-rank, slot"):
        TrainConfig(data="d", out="o", expert_labels="size").check()


def test_soft_dice_values():
    p = torch.tensor([[[1.0, 0.5], [0.0, 0.0]]])
    y = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    assert soft_dice(p, y, smooth=0.0).item() == pytest.approx(2 * 1.5 / (1.5 + 2))
    assert soft_dice(torch.zeros(1, 4), torch.zeros(1, 4)).item() == 1.0  # empty target, empty prediction


def test_loss_uses_the_drawn_annotator(synthetic_dir):
    from ssb_fast.data import load

    ds = load(synthetic_dir, "train")
    items = [ds[i] for i in range(4)]
    images = torch.stack([it["image"] for it in items])
    masks = torch.stack([it["masks"] for it in items])
    present = torch.stack([it["present"] for it in items])
    net = UNet(UNetConfig.preset("tiny", image_size=32, scan_channels=ds.image_channels, n_labels=ds.n_raters))
    d = draw(present, net.null_label, 1000, 0.0, torch.Generator().manual_seed(1))
    seen = {}

    def spy(x, t, label):
        seen["x"], seen["label"] = x, label
        return net(x, t, label)

    parts = ssb_loss(spy, Bridge(), images, masks, d, lambda_dice=0.1)
    assert torch.equal(seen["label"], d.label)
    assert torch.equal(seen["x"][:, 1:], images)  # the scan is the condition
    assert parts.loss.item() == pytest.approx(parts.mse.item() + 0.1 * parts.dice_loss.item(), rel=1e-5)
    parts.loss.backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


def test_stream_covers_each_epoch_and_splits_ranks():
    stream = ShuffledStream(10, seed=0)
    epoch0 = [i for s in range(5) for i in stream.batch_indices(s, 2)]
    assert sorted(epoch0) == list(range(10))
    r0, r1 = stream.batch_indices(3, 4, rank=0, world=2), stream.batch_indices(3, 4, rank=1, world=2)
    assert not set(r0) & set(r1) or len(set(r0 + r1)) < 8  # disjoint unless an epoch boundary wraps
    assert stream.batch_indices(7, 3) == ShuffledStream(10, seed=0).batch_indices(7, 3)
    assert stream.batch_indices(7, 3) != ShuffledStream(10, seed=1).batch_indices(7, 3)


def test_resume_continues_bit_for_bit(synthetic_dir, tmp_path):
    """A run of 10 steps resumed with the target raised to 20 equals a run of 20. A cosine schedule would change
    with the target (it decays towards --steps), so this one is constant; tests/test_train_faults.py resumes
    cosine runs stopped short of an unchanged target."""
    from ssb_fast.devices import set_threads

    set_threads(None)  # the thread count the CLI sets below: CPU sums are bit-exact only at one thread count
    straight = train(tiny_config(synthetic_dir, tmp_path / "straight", steps=20, lr_schedule="constant"),
                     progress=False)
    half = tmp_path / "split"
    result = runner.invoke(app, ["train", "--data", str(synthetic_dir), "--out", str(half), "--preset", "tiny",
                                 "--steps", "10", "--batch-size", "4", "--lr", "2e-3", "--warmup-steps", "5",
                                 "--lr-schedule", "constant",
                                 "--log-every", "5", "--save-every", "10", "--val-every", "0", "--seed", "3",
                                 "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["train", "--resume", str(half), "--steps", "20", "--no-progress"])
    assert result.exit_code == 0, result.output
    a = load_model(tmp_path / "straight" / "model.safetensors", weights="model").state_dict()
    b = load_model(half / "model.safetensors", weights="model").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ea = load_model(tmp_path / "straight" / "model.safetensors").state_dict()
    eb = load_model(half / "model.safetensors").state_dict()
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    assert straight.step == 20
    lines = [json.loads(x) for x in (half / "log.jsonl").read_text().splitlines()]
    assert [x.get("event") for x in lines if "event" in x] == ["start", "resume"]
    assert [x["step"] for x in lines if "loss" in x] == [5, 10, 15, 20]
    assert all(x["effective_batch"] == 4 for x in lines if "loss" in x)
    assert {"config.json", "model.safetensors", "train_state.safetensors", "log.jsonl"} <= set(os.listdir(half))


def test_tiny_model_loss_falls(synthetic_dir, tmp_path):
    cfg = tiny_config(synthetic_dir, tmp_path / "run", steps=200, batch_size=8, log_every=20, save_every=200)
    train(cfg, progress=False)
    losses = [json.loads(x)["loss"] for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()
              if '"loss"' in x]
    assert losses[-1] < 0.6 * losses[0], losses


def test_cli_refuses_bad_arguments(synthetic_dir, tmp_path):
    result = runner.invoke(app, ["train", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "--data and --out are required" in result.output
    run = tmp_path / "run"
    ok = runner.invoke(app, ["train", "--data", str(synthetic_dir), "--out", str(run), "--preset", "tiny",
                             "--steps", "2", "--batch-size", "2", "--val-every", "0", "--device", "cpu",
                             "--no-progress"])
    assert ok.exit_code == 0, ok.output
    again = runner.invoke(app, ["train", "--data", str(synthetic_dir), "--out", str(run), "--preset", "tiny",
                                "--steps", "2", "--device", "cpu", "--no-progress"])
    assert again.exit_code == 2 and "already holds a run" in again.output
    changed = runner.invoke(app, ["train", "--resume", str(run), "--lr", "0.1"])
    assert changed.exit_code == 2 and "cannot change lr" in changed.output
    preset = runner.invoke(app, ["train", "--data", str(synthetic_dir), "--out", str(tmp_path / "p"),
                                 "--preset", "huge", "--device", "cpu", "--no-progress"])
    assert preset.exit_code == 2 and "huge" in preset.output
    (run / "train_state.safetensors").write_bytes(b"\x00" * 3)
    broken = runner.invoke(app, ["train", "--resume", str(run), "--steps", "4", "--no-progress"])
    assert broken.exit_code == 4 and "truncated or corrupt checkpoint" in broken.output


def test_cli_reports_bad_data_with_exit_code_3(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "meta.json").write_text("{}")
    (bad / "train.npz").write_bytes(b"not an npz")
    result = runner.invoke(app, ["train", "--data", str(bad), "--out", str(tmp_path / "r"), "--preset", "tiny",
                                 "--device", "cpu", "--no-progress"])
    assert result.exit_code == 3, result.output
    assert "train.npz" in result.output and "Traceback" not in result.output


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, data, out, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    res = train(tiny_config(data, out, steps=4, batch_size=2, log_every=2, save_every=4), progress=False)
    torch.save({k: v.clone() for k, v in res.model.state_dict().items()}, os.path.join(result_dir, f"{rank}.pt"))


def test_two_process_gloo_ends_with_identical_weights(synthetic_dir, tmp_path):
    out, results = tmp_path / "ddp", tmp_path / "weights"
    results.mkdir()
    mp.start_processes(_ddp_worker, args=(2, _free_port(), str(synthetic_dir), str(out), str(results)), nprocs=2,
                       join=True, start_method="spawn")
    w0, w1 = torch.load(results / "0.pt"), torch.load(results / "1.pt")
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    single = load_model(out / "model.safetensors", weights="model").state_dict()
    assert all(torch.equal(single[k], w0[k]) for k in w0), "rank 0 wrote the weights both ranks hold"
    start = json.loads((out / "log.jsonl").read_text().splitlines()[0])
    assert start["world_size"] == 2 and start["effective_batch"] == 4


def test_learning_rate_warms_up_then_follows_the_schedule():
    from ssb_fast.train.loop import MIN_LR_RATIO, learning_rate

    cos = TrainConfig(data="d", out="o", lr=1e-3, warmup_steps=10, steps=110)
    assert learning_rate(cos, 0) == pytest.approx(1e-4) and learning_rate(cos, 9) == pytest.approx(1e-3)
    assert learning_rate(cos, 10) == pytest.approx(1e-3)
    assert learning_rate(cos, 60) == pytest.approx(1e-3 * (MIN_LR_RATIO + (1 - MIN_LR_RATIO) / 2))
    assert learning_rate(cos, 110) == pytest.approx(1e-3 * MIN_LR_RATIO)
    const = TrainConfig(data="d", out="o", lr=1e-3, warmup_steps=10, steps=110, lr_schedule="constant")
    assert learning_rate(const, 100) == 1e-3
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(data="d", out="o", lr_schedule="step").check()


def test_validation_protocol_logs_references_and_keeps_the_best_checkpoint(synthetic_dir, tmp_path):
    """Validation on scans spread over the split: mean and standard error, the ratio to the no-diversity
    reference with its interval, the references once per run, and best.safetensors at the lowest GED."""
    from ssb_fast.train.validate import validation_cases

    from ssb_fast.checkpoint import MODEL_FORMAT, read_checkpoint

    cfg = tiny_config(synthetic_dir, tmp_path / "run", steps=6, val_every=2, val_scans=4, val_samples=3,
                      nfe_val=2)
    train(cfg, progress=False)
    lines = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    refs = [x for x in lines if x.get("event") == "references"]
    assert len(refs) == 1 and refs[0]["n_scans"] == 4 and refs[0]["no_diversity_ged"] >= 0
    assert {"readers_ged", "readers_ged_se", "readers_empty_rate"} <= set(refs[0])
    vals = [x["val"] for x in lines if "val" in x]
    assert len(vals) == 3
    for v in vals:
        assert {"ged", "ged_se", "d_max", "empty_rate", "ged_ratio_to_no_diversity", "ged_ratio_low",
                "ged_ratio_high"} <= set(v)
        assert v["ged_ratio_low"] <= v["ged_ratio_to_no_diversity"] <= v["ged_ratio_high"]
    _, meta = read_checkpoint(tmp_path / "run" / "best.safetensors", MODEL_FORMAT)
    best = meta["config"]
    assert best["val"]["ged"] == min(v["ged"] for v in vals)
    from ssb_fast.data import load

    assert validation_cases(load(synthetic_dir, "val"), 4) != [0, 1, 2, 3]  # spread, not the first four


def _cli_run(data, out, *extra):
    return runner.invoke(app, ["train", "--data", str(data), "--out", str(out), "--preset", "tiny", "--steps", "2",
                               "--batch-size", "2", "--val-every", "0", "--device", "cpu", "--threads", "1",
                               "--no-progress", *extra])


def test_a_run_that_never_saved_says_so_and_starts_again_on_the_same_out(synthetic_dir, tmp_path):
    run = tmp_path / "run"
    assert _cli_run(synthetic_dir, run).exit_code == 0
    for name in ("model.safetensors", "train_state.safetensors"):  # as if killed before its first save
        (run / name).unlink()
    resumed = runner.invoke(app, ["train", "--resume", str(run), "--no-progress"])
    assert resumed.exit_code == 2, resumed.output
    assert "never saved a checkpoint" in resumed.output and "start it again with the same --out" in resumed.output
    assert "no such checkpoint file" not in resumed.output
    again = _cli_run(synthetic_dir, run)
    assert again.exit_code == 0, again.output
    lines = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [x["event"] for x in lines if "event" in x] == ["start"], "one run, one start line"
    assert lines[0]["kept_aside"] == ["log.unsaved-1.jsonl"]
    assert (run / "log.unsaved-1.jsonl").read_text().count('"start"') == 1
    refused = _cli_run(synthetic_dir, run)  # this one saved: the folder is taken
    assert refused.exit_code == 2 and "already holds a run" in refused.output and "--resume" in refused.output


def test_a_folder_in_use_is_refused_and_a_dead_holder_leaves_no_lock(synthetic_dir, tmp_path):
    import signal
    import subprocess
    import sys

    from ssb_fast import run_lock
    from ssb_fast.run_lock import FolderBusyError, RunLock

    run = tmp_path / "run"
    with RunLock(run):
        busy = _cli_run(synthetic_dir, run)
        assert busy.exit_code == 2, busy.output
        assert f"is in use by another ssb-fast train (pid {os.getpid()} on" in busy.output
    assert _cli_run(synthetic_dir, run).exit_code == 0
    with RunLock(run):
        busy = runner.invoke(app, ["train", "--resume", str(run), "--steps", "3", "--no-progress"])
        assert busy.exit_code == 2 and "in use by another" in busy.output
    # A holder killed with SIGKILL: the kernel drops its lock; only the file stays.
    holder = subprocess.Popen([sys.executable, "-c", "import importlib.util, sys, time\n"
                               f"spec = importlib.util.spec_from_file_location('run_lock', {run_lock.__file__!r})\n"
                               "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
                               f"m.RunLock({str(run)!r}).acquire(); print('locked', flush=True); time.sleep(120)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(FolderBusyError, match=f"pid {holder.pid} on"):
            RunLock(run).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (run / run_lock.LOCK_FILE).exists()
    RunLock(run).acquire().release()
    assert runner.invoke(app, ["train", "--resume", str(run), "--steps", "3", "--no-progress"]).exit_code == 0


@pytest.mark.parametrize("signame", ["SIGUSR1", "SIGINT"])
def test_a_stop_signal_finishes_the_step_saves_and_exits_with_128_plus_the_signal(synthetic_dir, tmp_path,
                                                                                 monkeypatch, signame):
    import signal

    from ssb_fast.train import loop

    from ssb_fast.checkpoint import TRAIN_STATE_FORMAT, read_checkpoint

    signum = getattr(signal, signame)
    real = loop.learning_rate

    def signal_at_step_3(cfg, step):
        if step == 3:
            os.kill(os.getpid(), signum)  # arrives in the middle of step 3
        return real(cfg, step)

    monkeypatch.setattr(loop, "learning_rate", signal_at_step_3)
    unhandled = []
    fallback = lambda *args: unhandled.append(signame)  # so that a run that ignores the signal fails cleanly
    previous = signal.signal(signum, fallback)
    try:
        run = tmp_path / "run"
        result = _cli_run(synthetic_dir, run, "--steps", "10", "--save-every", "1000", "--save-minutes", "0")
        assert signal.getsignal(signum) is fallback, "training puts the previous handler back"
    finally:
        signal.signal(signum, previous)
    assert not unhandled, "training did not handle the signal"
    assert result.exit_code == 128 + signum, result.output
    assert f"stopped by {signame} after step 4, saved" in result.output
    assert read_checkpoint(run / "train_state.safetensors", TRAIN_STATE_FORMAT)[1]["step"] == "4"
    last = json.loads((run / "log.jsonl").read_text().splitlines()[-1])
    assert last == {"event": "stopped", "step": 4, "signal": signame}


def test_save_minutes_saves_on_the_clock(synthetic_dir, tmp_path, monkeypatch):
    from ssb_fast.train import loop

    saves = []
    real = loop.save_resume_point
    monkeypatch.setattr(loop, "save_resume_point", lambda *a, **k: (saves.append(a[6]), real(*a, **k)))
    train(tiny_config(synthetic_dir, tmp_path / "a", steps=4, save_every=1000, save_minutes=1e-9), progress=False)
    assert saves == [1, 2, 3, 4]  # every step is past the (tiny) interval
    saves.clear()
    train(tiny_config(synthetic_dir, tmp_path / "b", steps=4, save_every=1000, save_minutes=0), progress=False)
    assert saves == [4]
    with pytest.raises(ValueError, match="save_minutes"):
        tiny_config(synthetic_dir, tmp_path / "c", save_minutes=-1).check()


def test_resume_drops_a_log_line_cut_by_a_kill(synthetic_dir, tmp_path):
    run = tmp_path / "run"
    assert _cli_run(synthetic_dir, run).exit_code == 0
    with open(run / "log.jsonl", "a") as fh:
        fh.write('{"step": 3, "loss": 0.1')
    assert runner.invoke(app, ["train", "--resume", str(run), "--steps", "3", "--no-progress"]).exit_code == 0
    lines = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [x.get("event") for x in lines if "event" in x] == ["start", "resume"]


def _ddp_refused_worker(rank, world, port, data, out, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        train(tiny_config(data, out, steps=2, batch_size=2), progress=False)
        message = "trained"
    except FileExistsError as err:
        message = f"{type(err).__name__}: {err}"
    with open(os.path.join(result_dir, f"{rank}.txt"), "w") as fh:
        fh.write(message)


@pytest.mark.slow
def test_under_torchrun_every_rank_gets_rank_0s_refusal(synthetic_dir, tmp_path):
    """Rank 0 alone checks and locks the folder; its refusal reaches every rank instead of leaving the others
    waiting at a collective."""
    out, results = tmp_path / "run", tmp_path / "results"
    results.mkdir()
    train(tiny_config(synthetic_dir, out, steps=2, batch_size=2), progress=False)
    mp.start_processes(_ddp_refused_worker, args=(2, _free_port(), str(synthetic_dir), str(out), str(results)),
                       nprocs=2, join=True, start_method="spawn")
    for rank in (0, 1):
        assert "FileExistsError" in (results / f"{rank}.txt").read_text()
        assert "already holds a run" in (results / f"{rank}.txt").read_text()
