"""python capture.py model=smollm2_135m data=wiki — see conf/capture.yaml."""

import hydra
from omegaconf import DictConfig


@hydra.main(config_path="conf", config_name="capture", version_base="1.3")
def main(cfg: DictConfig):
    from tqlab.cli import run_app
    from tqlab.tasks import capture

    return run_app(capture, cfg)


if __name__ == "__main__":
    main()
