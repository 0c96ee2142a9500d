"""Bad input and faults: files that would run code, truncated files, divergence, unsafe names."""

import json
import os
import stat

import pytest
import torch

import train_eval
from model import atomic_save, create_model, read_checkpoint, save_checkpoint
from train_eval import make_config, run_dir_for, train


class RunsCode:
    """Unpickling this calls os.system: a checkpoint must never be read that way."""

    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_a_checkpoint_whose_unpickling_would_run_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"arch": {"name": "vgg8"}, "model": {}, "payload": RunsCode()}, path)
    with pytest.raises(ValueError, match="refusing to load .*evil.pt.*could run code"):
        read_checkpoint(str(path))


def test_a_truncated_checkpoint_names_the_file_and_the_remedy(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(str(path), create_model("vgg8", num_classes=10, width=0.0625), config=make_config("smoke"))
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="cannot read checkpoint .*checkpoint.pt.*truncated: delete it"):
        read_checkpoint(str(path))


def test_own_checkpoints_load_with_weights_only_including_training_state(smoke_cfg):
    result = train(smoke_cfg(epochs=1, schedule="multistep", milestones=[1]))  # MultiStepLR keeps a Counter
    ckpt = read_checkpoint(result.run_dir)
    assert ckpt["epoch"] == 1 and "train_state" in ckpt and ckpt["config"]["epochs"] == 1


def test_divergence_stops_before_the_checkpoint_is_overwritten(smoke_cfg):
    cfg = smoke_cfg(epochs=2, lr=1e6)
    with pytest.raises(FloatingPointError, match="diverged in epoch 1 .*nothing was saved.*--lr"):
        train(cfg)
    assert not os.path.exists(os.path.join(run_dir_for(cfg), "checkpoint.pt"))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(name="../../x"), "plain folder name"),
        (dict(name=".hidden"), "plain folder name"),
        (dict(width=0.0), "width must be > 0"),
        (dict(width=-1.0), "width must be > 0"),
        (dict(width=float("nan")), "not a finite number"),
        (dict(lr=float("inf")), "not a finite number"),
        (dict(subset=-5), "subset must be >= 0"),
        (dict(hint_stage=9), "stages 0-4"),
        (dict(momentum=5.0), "momentum must be in \\[0, 1\\)"),
        (dict(seed=-1), "seed must be >= 0"),
    ],
)
def test_unusable_values_are_refused_with_the_valid_range(overrides, message):
    with pytest.raises(ValueError, match=message):
        make_config("smoke", **overrides)


def test_a_name_clash_leaves_the_existing_runs_config_alone(smoke_cfg):
    first = train(smoke_cfg(epochs=1, name="mine"))
    before = open(os.path.join(first.run_dir, "config.json")).read()
    with pytest.raises(RuntimeError, match="different config"):
        train(smoke_cfg(epochs=2, lr=0.01, name="mine"))
    assert open(os.path.join(first.run_dir, "config.json")).read() == before
    assert json.loads(before)["epochs"] == 1


def test_saved_files_respect_the_umask_and_stale_temporaries_are_cleared(smoke_cfg, tmp_path):
    old = os.umask(0o022)
    try:
        atomic_save({"x": torch.zeros(1)}, str(tmp_path / "a.pt"))
        assert stat.S_IMODE(os.stat(tmp_path / "a.pt").st_mode) == 0o644
    finally:
        os.umask(old)
    cfg = smoke_cfg(epochs=1)
    os.makedirs(run_dir_for(cfg))
    stale = os.path.join(run_dir_for(cfg), ".tmp-killed.pt")
    open(stale, "wb").close()  # what kill -9 during a save leaves behind
    train(cfg)
    assert not os.path.exists(stale)


def test_library_errors_on_the_command_line_are_usage_errors(synthetic_dir, tmp_path, capsys):
    import train_kd

    with pytest.raises(SystemExit) as exit_:
        train_kd.main(["--profile", "smoke", "--data-dir", synthetic_dir, "--width", "0"])
    assert exit_.value.code == 2 and "width must be > 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        train_eval.main(["--profile", "smoke", "--data-dir", synthetic_dir, "--momentum", "5"])
    assert exit_.value.code == 2 and "momentum" in capsys.readouterr().err


def test_a_truncated_teacher_cache_file_is_computed_again(synthetic_dir, tmp_path):
    import data_utils
    from teacher_cache import CachedTeacherLoader
    from train_kd import FrozenTeacher

    loader = data_utils.get_cifar10_loaders(batch_size=100, data_dir=synthetic_dir).train
    teacher = FrozenTeacher(create_model("vgg8", num_classes=10, width=0.0625))
    cache = CachedTeacherLoader(loader, teacher, str(tmp_path), dtype=torch.float32)
    good = cache.epoch_logits(0)
    path = tmp_path / cache.key / "epoch_0000.pt"
    path.write_bytes(path.read_bytes()[:100])
    assert torch.equal(cache.epoch_logits(0), good) and cache.computed == 2


def test_the_data_is_part_of_a_runs_identity(synthetic_dir, tmp_path):
    import shutil

    other = tmp_path / "copy"
    shutil.copytree(synthetic_dir, other)
    a = make_config("smoke", data_dir=synthetic_dir)
    assert run_dir_for(a) == run_dir_for(make_config("smoke", data_dir=str(other)))  # same bytes, same run
    batch = other / "cifar-10-batches-py" / "data_batch_1"
    batch.write_bytes(batch.read_bytes()[:-1] + b"\0")  # one byte differs
    assert run_dir_for(a) != run_dir_for(make_config("smoke", data_dir=str(other)))


def test_a_retrained_teacher_makes_a_new_student_and_unfinished_ones_are_refused(smoke_cfg):
    import train_kd

    teacher_cfg = smoke_cfg(model="vgg11", epochs=2, name="teacher")

    class Stop(Exception):
        pass

    def stop_after_first(epoch, row):
        raise Stop

    # a teacher killed after epoch 1 of 2
    loaders = train_eval.make_loaders(teacher_cfg)
    model = create_model("vgg11", num_classes=10, width=teacher_cfg.width)
    with pytest.raises(Stop):
        train_eval.fit(model, loaders.train, loaders.test, teacher_cfg, run_dir_for(teacher_cfg), (stop_after_first,))
    student = smoke_cfg(method="kd", teacher=run_dir_for(teacher_cfg), epochs=1)
    with pytest.raises(ValueError, match="stopped at epoch 1 of 2.*--trust-teacher"):
        train_kd.distill(student)
    early = run_dir_for(student)
    train(teacher_cfg)  # finishes (resumes) the teacher: its weights change
    assert run_dir_for(student) != early


def test_a_teacher_at_chance_level_is_refused_unless_trusted(smoke_cfg):
    import train_kd

    path = os.path.join(smoke_cfg().out_dir, "random-teacher.pt")
    save_checkpoint(path, create_model("vgg8", num_classes=10, width=0.0625), config=None)
    with pytest.raises(ValueError, match="near chance.*--trust-teacher"):
        train_kd.distill(smoke_cfg(method="kd", teacher=path, epochs=1))
    assert train_kd.distill(smoke_cfg(method="kd", teacher=path, epochs=1, trust_teacher=True)).history is not None


def test_generated_data_is_marked_and_real_data_runs_refuse_it(synthetic_dir):
    import data_utils

    assert data_utils.is_generated("cifar10", synthetic_dir)
    with pytest.raises(ValueError, match="holds generated data.*--synthetic"):
        train(make_config("cpu", data_dir=synthetic_dir, subset=0, val_size=0, epochs=1))


def test_a_truncated_data_file_names_the_file_and_the_remedy(synthetic_dir, tmp_path):
    import shutil

    import data_utils

    shutil.copytree(synthetic_dir, tmp_path / "d")
    batch = tmp_path / "d" / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:5000])
    with pytest.raises(ValueError, match="data_batch_3.*truncated or not a CIFAR pickle.*Re-create"):
        data_utils.load_cifar("cifar10", str(tmp_path / "d"), train=True)
