"""Model: the bundled net, an uploaded state_dict, or a freshly trained one."""

import streamlit as st

from qcore.checkpoint import CheckpointError, checkpoint_bytes, load_model
from qcore.data import DataNotFoundError
from qcore.figures import training_curve_figure
from qcore.train import TrainConfig, TrainProgress, train
from ui import cache, session

TRAIN_STATE_KEY = "qlab_training"

st.title("Model")
entry = session.current_model()
st.markdown(
    "Quantization starts from a trained float network. This is the original notebook's CNN: "
    "conv 1→20 (5×5), max-pool, conv 20→50 (5×5), max-pool, fully connected 800→500 and 500→10."
)
st.latex(r"x = \frac{\text{pixel}/255 - 0.1307}{0.3081}")
st.caption(
    "Every image is scaled and standardized like this before it reaches conv1; quantizing the input "
    "means quantizing this x."
)
st.info(f"Current model: **{entry.name}** (fingerprint `{entry.fingerprint}`)")

folder = session.data_folder()
try:
    mnist = cache.shared_mnist(folder)
    st.caption(f"MNIST from `{folder}`: {len(mnist.train)} training and {len(mnist.test)} test images.")
except DataNotFoundError as error:
    st.error(f"**MNIST is not available.** {error}")
    mnist = None

bundled_tab, upload_tab, train_tab = st.tabs(["Bundled net", "Upload a state_dict", "Train a new net"])

with bundled_tab:
    st.markdown(
        "Trained by `python -m qcore train` with the notebook's recipe (SGD lr 0.01, momentum 0.5, "
        "batch 64, 3 epochs, seed 1)."
    )
    if st.button("Use the bundled net", disabled=entry.name == "bundled pretrained net"):
        session.set_model(cache.bundled_model(), "bundled pretrained net")
        st.rerun()

with upload_tab:
    st.markdown("Upload a `state_dict` saved with `torch.save(model.state_dict(), path)` from this `Net`.")
    upload = st.file_uploader("Checkpoint (.pt or .pth)", type=["pt", "pth"], key="qlab_upload")
    if upload is not None and st.session_state.get("qlab_upload_done") != upload.file_id:
        st.session_state["qlab_upload_done"] = upload.file_id
        try:
            model = load_model(upload.getvalue())
        except CheckpointError as error:
            st.session_state["qlab_upload_error"] = (upload.name, error.problems)
        else:
            st.session_state.pop("qlab_upload_error", None)
            session.set_model(model, f"uploaded {upload.name}")
            st.rerun()
    if "qlab_upload_error" in st.session_state:
        name, problems = st.session_state["qlab_upload_error"]
        st.error(f"**{name} was not loaded; the previous model is kept.**\n\n" + "\n".join(f"- {p}" for p in problems))

with train_tab:
    recipe = TrainConfig()
    previous = st.session_state.get(TRAIN_STATE_KEY)
    if previous and previous["status"] == "running":  # the last run was interrupted mid-training
        previous["status"] = "cancelled"
    if previous and previous["status"] == "cancelled":
        st.warning(f"Training was cancelled after {previous['steps']} steps; the previous model is kept.")
    with st.form("train_form"):
        first, second, third = st.columns(3)
        epochs = first.number_input("Epochs", 1, 20, recipe.epochs)
        batch_size = first.number_input("Batch size", 1, 4096, recipe.batch_size)
        lr = second.number_input("Learning rate", 1e-5, 1.0, recipe.lr, format="%.4f")
        momentum = second.number_input("Momentum", 0.0, 0.99, recipe.momentum)
        seed = third.number_input("Seed", 0, 2**31 - 1, recipe.seed)
        samples = third.number_input("Training images (60000 = all)", 64, 60000, 60000, step=64)
        start = st.form_submit_button("Train", disabled=mnist is None)
    if start and mnist is not None:
        config = TrainConfig(
            epochs=int(epochs),
            batch_size=int(batch_size),
            lr=float(lr),
            momentum=float(momentum),
            seed=int(seed),
            train_samples=None if samples >= len(mnist.train) else int(samples),
        )
        state = {"status": "running", "steps": 0}
        st.session_state[TRAIN_STATE_KEY] = state
        st.button("Cancel training", help="Stops after the current step; the previous model is kept.")
        bar = st.progress(0.0, text="Starting…")
        chart = st.empty()
        history: list[dict[str, float]] = []

        def show(progress: TrainProgress) -> None:
            state["steps"] += 1
            history.append({"loss": progress.loss, "accuracy": progress.running_accuracy})
            if progress.step % 20 == 0 or progress.step == progress.steps_per_epoch:
                bar.progress(
                    progress.fraction_done,
                    text=f"Epoch {progress.epoch}/{progress.epochs}, step {progress.step}/{progress.steps_per_epoch}: "
                    f"loss {progress.loss:.3f}, running accuracy {session.percent(progress.running_accuracy)}",
                )
                chart.plotly_chart(training_curve_figure(history), key=f"curve_{len(history)}")

        try:
            result = train(mnist.train, config, on_progress=show)
        except (ValueError, RuntimeError) as error:  # bad settings, or the device failed mid-run
            state["status"] = "failed"
            st.error(f"Training failed; the previous model is kept. {error}")
        else:
            state["status"] = "done"
            accuracy = cache.float_result(
                session.set_model(result.model, "trained here").fingerprint, folder, result.model
            ).accuracy
            st.session_state["qlab_train_message"] = (
                f"Trained {config.epochs} epoch(s) on {len(result.history)} steps: test accuracy "
                f"{session.percent(accuracy)}. It is now the current model."
            )
            st.rerun()
    if "qlab_train_message" in st.session_state:
        st.success(st.session_state.pop("qlab_train_message"))

st.divider()
st.download_button(
    "Download the current checkpoint (state_dict)",
    checkpoint_bytes(entry.model),
    file_name=f"qlab_{entry.fingerprint}.pt",
    mime="application/octet-stream",
)
