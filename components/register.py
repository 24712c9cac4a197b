"""register: the student (and, if configured, the teacher) into the MLflow Model Registry."""

from kfp import dsl
from kfp.dsl import HTML, Artifact, Input, Markdown, Model, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def register(
    student: Input[Model],
    student_evaluation: Input[Artifact],
    teacher: Input[Model],
    teacher_evaluation: Input[Artifact],
    params: Input[Artifact],
    tracking_uri: str,
    experiment: str,
    model_name: str,
    decision: Output[Markdown],
    result: Output[Artifact],
    card: Output[HTML],
    may_promote: bool = True,
) -> str:
    """Register the evaluated models with aliases challenger / champion (iagn.runner.register).

    Registering the same checkpoint again returns the existing version, so a retry is safe.

    Args:
        student: The student checkpoint.
        student_evaluation: The student's evaluation folder (metrics.json).
        teacher: The stage-3 checkpoint (registered when register.register_teacher).
        teacher_evaluation: The teacher's evaluation folder.
        params: The run's params.yaml (section register).
        tracking_uri: MLflow tracking URI ("" = the environment's, else ./mlflow.db).
        experiment: MLflow experiment ("" = $MLFLOW_EXPERIMENT_NAME, else iagn).
        model_name: Registered model name ("" = register.model_name of params.yaml).
        decision: What was registered, with aliases and why.
        result: register.json (the decision per model) and each version's model card.
        card: The registered student's model card (also logged to its MLflow model).
        may_promote: False registers `challenger` only (a sweep's winner).

    Returns:
        The student's model URI, models:/<name>/<version>.
    """
    import shutil

    from components.runtime import (
        StepFailed,
        configure_step,
        readable_errors,
        register_markdown,
        step_params,
        write_text,
    )
    from iagn import runner

    with readable_errors():
        configure_step(tracking_uri, experiment)
        outcome = runner.register(
            student=student.path,
            student_eval=student_evaluation.path,
            params=step_params(params.path, None, model_name),
            teacher=teacher.path,
            teacher_eval=teacher_evaluation.path,
            out=result.path,
            ends_pipeline=False,  # the exit handler ends the pipeline's MLflow parent
            may_promote=may_promote,
        )
        write_text(decision.path, register_markdown(outcome))
        first = outcome["outcomes"][0]
        if first.get("card"):
            shutil.copyfile(first["card"], card.path)
        else:
            write_text(card.path, "<p>The student was not registered: no model card.</p>\n")
        if not outcome["passed"]:
            raise StepFailed("the student failed the gate: " + "; ".join(first["gate_failures"]))
    uri = f"models:/{first['model_name']}/{first['version']}"
    aliases = "champion, challenger" if first["champion"] else "challenger"
    print(f"registered {uri} ({aliases}): {first['reason']}")
    return uri
