"""MoCo pretraining of the DrasCLR encoder (Yu et al. 2023, Sections 2.3-2.5, 3): `train`,
`TrainConfig`.

    import drasclr
    result = drasclr.train(store="store/", atlas="atlas.npz", out_dir="runs/a", epochs=20)
    encoder = drasclr.load_encoder(result.checkpoint)
"""
from drasclr.pretrain.config import TrainConfig
from drasclr.pretrain.trainer import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train"]
