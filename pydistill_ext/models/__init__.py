"""Reference networks of the distillation papers and pretrained teachers.

    from pydistill_ext.models import get_model, known_models
    net = get_model("convnet", channels=3, num_classes=10, im_size=(32, 32), seed=0)
    logits = net(x)                      # [N, 10]
    emb = net.embed(x)                   # [N, 2048]  (DM)
    maps, logits = net.feature_maps(x)   # per-block activations + logits (attention matching)

Every model works with ``torch.func.functional_call`` and under ``torch.func.vmap`` over the
parameters of several models stacked with ``torch.func.stack_module_state`` (how trajectory
matching batches experts). With BatchNorm in train mode the buffers must be stacked too
(``in_dims=0``; each model's running statistics are then updated in its slice): vmapping
train-mode BatchNorm with one shared, unbatched set of buffers is refused by PyTorch. In eval
mode, or without BatchNorm, shared buffers (``in_dims=None``) work as well.
"""
from pydistill_ext.models.convnet import ConvNet
from pydistill_ext.models.mlp import MLP
from pydistill_ext.models.registry import describe_models, get_model, known_models
from pydistill_ext.models.resnet import ResNet
from pydistill_ext.models.teachers import load_digit_recognizer_teacher

__all__ = ["ConvNet", "ResNet", "MLP", "get_model", "known_models", "describe_models",
           "load_digit_recognizer_teacher"]
