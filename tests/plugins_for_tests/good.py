import torch

import attnkit
from attnkit.reference_backend import ReferenceBackend


class Good(ReferenceBackend):
    name = "good"
    capabilities = attnkit.Capabilities(devices=frozenset({"cpu"}),
                                        dtypes=frozenset({torch.float32}), head_dim_max=128,
                                        softcap=False)


class Better(Good):
    name = "better"
    capabilities = attnkit.Capabilities(devices=frozenset({"cpu"}),
                                        dtypes=frozenset({torch.float32}), head_dim_max=64,
                                        backward=False)


class Unavailable(Good):
    name = "unavailable"

    def availability(self):
        return False, "needs a flux capacitor"


@attnkit.hookimpl
def attnkit_register_backends(register):
    register(Good(), priority=10)
    register(Better(), priority={"cpu": 20})
    register(Unavailable(), priority=99)
