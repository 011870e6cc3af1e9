"""run.py as users call it: dispatch table, config errors, stop with nothing running."""

import socket

import pytest

from runner_helpers import free_port, output, run_cli


def test_unknown_action_lists_valid_ones(exp_dir):
    result = run_cli(f"experiment.exp_dir={exp_dir}", "action=dryrun")
    assert result.returncode != 0
    text = output(result)
    assert "action='dryrun'" in text
    assert "serve: run, stop, test" in text
    assert "Traceback" not in text


def test_unknown_task_type(exp_dir):
    result = run_cli(f"experiment.exp_dir={exp_dir}", "experiment.task.type=train", "action=run")
    assert result.returncode != 0
    assert "experiment.task.type='train'" in output(result)
    assert "serve: run, stop, test" in output(result)


def test_stop_with_nothing_running_is_ok(exp_dir):
    # a free port: a server on the default port (another exp_dir's) would make stop exit 1
    result = run_cli(
        f"experiment.exp_dir={exp_dir}", f"serve.engine.port={free_port()}", "action=stop"
    )
    assert result.returncode == 0, output(result)
    assert f"no server running for exp_dir {exp_dir}" in output(result)


def test_fs_serve_bad_deploy_options_are_refused(exp_dir):
    result = run_cli(
        f"experiment.exp_dir={exp_dir}",
        "experiment.runner.deploy.use_fs_serve=true",
        "+experiment.runner.deploy.num_replicas=0",
    )
    assert result.returncode != 0
    assert "experiment.runner.deploy.num_replicas: 1..1024, got 0" in output(result)


def test_legacy_deploy_is_moved_with_a_warning(exp_dir):
    # The legacy block carries a bad Ray option: its refusal under the new name proves the move.
    result = run_cli(
        f"experiment.exp_dir={exp_dir}",
        "+experiment.deploy.use_fs_serve=true",
        "+experiment.deploy.num_replicas=0",
    )
    text = output(result)
    assert "experiment.deploy is deprecated" in text
    assert "experiment.runner.deploy.num_replicas: 1..1024" in text
    assert result.returncode != 0


@pytest.mark.parametrize(
    "value, message",
    [
        ("'source /opt/env/bin/activate'", "shell builtin"),
        ("'echo a && echo b'", "shell syntax"),
        ("'echo $HOME'", "shell syntax"),
        ("{a: 1}", "expected a list of commands"),
    ],
)
def test_shell_style_cmds_are_refused(exp_dir, value, message):
    result = run_cli(f"experiment.exp_dir={exp_dir}", f"+experiment.cmds.before_start={value}")
    assert result.returncode != 0
    assert message in output(result)
    assert not (exp_dir / "serve_logs" / "pids").exists()


def test_after_stop_runs_argv_without_shell(exp_dir, tmp_path):
    marker = tmp_path / "after stop; $(touched)"  # literal: no shell ever sees it
    result = run_cli(
        f"experiment.exp_dir={exp_dir}",
        f"+experiment.cmds.after_stop=[[touch,'{marker}']]",
        "action=stop",
    )
    assert result.returncode == 0, output(result)
    assert marker.is_file()


def test_failing_after_stop_is_an_error(exp_dir):
    result = run_cli(
        f"experiment.exp_dir={exp_dir}", "+experiment.cmds.after_stop=['false']", "action=stop"
    )
    assert result.returncode != 0
    assert "experiment.cmds.after_stop: false exited with 1" in output(result)


def test_non_scalar_env_is_refused(exp_dir):
    result = run_cli(f"experiment.exp_dir={exp_dir}", "+experiment.envs.BAD=[1,2]", "action=stop")
    assert result.returncode != 0
    assert "experiment.envs.BAD: expected a string, number or boolean" in output(result)


def test_port_in_use(exp_dir):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        port = sock.getsockname()[1]
        result = run_cli(f"experiment.exp_dir={exp_dir}", f"serve.engine.port={port}")
    assert result.returncode != 0
    assert f"port {port} on 127.0.0.1 is already in use" in output(result)
    assert not (exp_dir / "serve_logs" / "pids" / "host_0_localhost.pid").exists()


def test_missing_model_dir(exp_dir, tmp_path):
    missing = tmp_path / "no-such-model"
    result = run_cli(
        f"experiment.exp_dir={exp_dir}",
        "serve.engine.random_init=false",
        f"serve.engine.model={missing}",
        f"serve.engine.port={free_port()}",
    )
    assert result.returncode != 0
    text = output(result)
    assert "invalid serve config: serve.engine.model" in text
    assert str(missing) in text
    assert "Traceback" not in text


def test_unknown_engine_key_is_named(exp_dir):
    result = run_cli(f"experiment.exp_dir={exp_dir}", "+serve.engine.num_step=3")
    assert result.returncode != 0
    assert "serve.engine.num_step: unknown key; did you mean 'num_steps'?" in output(result)


def test_resolved_config_is_written_with_absolute_exp_dir(exp_dir):
    # The real-checkpoint config fails validation (no /models here), after the config is written.
    result = run_cli(f"experiment.exp_dir={exp_dir}", config="serve")
    assert result.returncode != 0
    text = (exp_dir / "serve_logs" / "scripts" / "serve.yaml").read_text()
    assert f"exp_dir: {exp_dir}\n" in text
    assert "action: run" in text and "${" not in text
