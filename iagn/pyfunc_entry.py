"""The code MLflow stores with every logged iagn model and runs to load it ("models from code").

Logging the model as this file rather than a pickled object keeps the stored model free of
pickles and of the Python version that wrote them; `iagn` itself travels in the model's
code_paths (see iagn/serving.py).
"""

import mlflow.models

from iagn.serving import IagnModel

mlflow.models.set_model(IagnModel())
