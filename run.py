"""FlagScale-compatible launcher.

usage: python run.py --config-path ./examples/pi0/conf --config-name <serve|serve_demo>
                     action=run|test|stop [overrides ...]

  --config-name serve_demo   tiny random-weight Pi0 on the CPU (no downloads)
  --config-name serve        a real checkpoint (serve/pi0.yaml: /models/... paths, cuda, bfloat16)
  action=run                 pre-flight checks, start the server in the background, wait for
                             /health (exit 0 once ready); action=test: run, one /infer, stop;
                             action=stop: stop the server started for the same exp_dir

common overrides (any Hydra override works; `+key=value` adds a key the YAML lacks):
  serve.engine.port=9011 serve.engine.host=0.0.0.0
  serve.engine.model=/data/pi0 serve.engine.tokenizer=/data/paligemma-3b-pt-224
  serve.engine.stat_path=/data/meta/stats.json
  serve.engine.device=cpu serve.engine.torch_dtype=float32
  experiment.exp_dir=/tmp/pi0 (action=stop needs the same one)
  experiment.runner.foreground=true (containers) experiment.envs.USE_FLAGGEMS=true

docs/configuration.md lists every key; Hydra's own options: python run.py --hydra-help
"""

import sys

from pathlib import Path

import hydra

from omegaconf import DictConfig

from flagscale.runner.dispatch import dispatch

REPO_ROOT = Path(__file__).resolve().parent


@hydra.main(version_base=None, config_name="config")
def main(cfg: DictConfig) -> None:
    sys.exit(dispatch(cfg, REPO_ROOT))


if __name__ == "__main__":
    if {"-h", "--help"} & set(sys.argv[1:]):
        print(__doc__.strip())
        sys.exit(0)
    main()
