"""python report.py runs=<run or multirun folder> — see conf/report.yaml."""

import hydra
from omegaconf import DictConfig


@hydra.main(config_path="conf", config_name="report", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from tqlab.tasks import report

    report(cfg)


if __name__ == "__main__":
    main()
