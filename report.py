"""python report.py runs=multirun/eval/<date>/<time> — see conf/report.yaml."""

import hydra
from omegaconf import DictConfig


@hydra.main(config_path="conf", config_name="report", version_base="1.3")
def main(cfg: DictConfig):
    from tqlab.cli import run_app
    from tqlab.tasks import report

    return run_app(report, cfg)


if __name__ == "__main__":
    main()
