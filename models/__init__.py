"""Subclassed Keras models, each registered for `.keras` serialization.

Importing this package registers every class, so `keras.models.load_model` (safe mode on)
can rebuild any artifact the trainer exports.
"""

from models.convnet import SmallConvNet
from models.custom_bn import CustomBatchNormModel
from models.custom_dense import CustomDense, MySubclassedModel
from models.custom_variable import CustomModelWithVariableLayer, CustomVariableLayer
from models.dropout_mlp import DropoutMLP
from models.recurrent import GRURegressor

__all__ = [
    "CustomBatchNormModel",
    "CustomDense",
    "CustomModelWithVariableLayer",
    "CustomVariableLayer",
    "DropoutMLP",
    "GRURegressor",
    "MySubclassedModel",
    "SmallConvNet",
]
