"""MLflow models-from-code entry point: the file ``tasks.registry.log_model_version`` logs as the model.

MLflow stores this file (no pickle) and runs it when the model is loaded; all logic lives in
:class:`tasks.pyfunc.ConvMFPyfunc`, which needs the convmf-pipeline package installed where the model is loaded.
"""

from mlflow.models import set_model

from tasks.pyfunc import ConvMFPyfunc

set_model(ConvMFPyfunc())
