import os
import sys

import torch._dynamo
from hypothesis import HealthCheck, settings

# the tests' helpers (tiny_models, strategies) import as top-level modules from every test folder
sys.path.insert(0, os.path.dirname(__file__))

settings.register_profile(
    "blindsight", deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.load_profile("blindsight")

# Many small compiled variants per session (models x batch sizes x backends): never fall back to eager silently.
torch._dynamo.config.recompile_limit = 64
torch._dynamo.config.accumulated_recompile_limit = 4096
torch._dynamo.config.fail_on_recompile_limit_hit = True
