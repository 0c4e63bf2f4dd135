"""python train.py rotation=block_so8_learned bits=2 — see conf/train.yaml."""

import hydra
from omegaconf import DictConfig


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig):
    from tqlab.cli import run_app
    from tqlab.tasks import train

    return run_app(train, cfg)


if __name__ == "__main__":
    main()
