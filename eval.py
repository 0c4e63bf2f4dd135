"""python eval.py rotation=random_haar bits=3 — see conf/eval.yaml."""

import hydra
from omegaconf import DictConfig


@hydra.main(config_path="conf", config_name="eval", version_base="1.3")
def main(cfg: DictConfig):
    from tqlab.cli import run_app
    from tqlab.tasks import evaluate

    return run_app(evaluate, cfg)


if __name__ == "__main__":
    main()
