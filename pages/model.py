"""Model: a zoo model (and so its dataset), an uploaded state_dict of its architecture, or a freshly trained one."""

import streamlit as st

from qcore.data import DATASETS, INPUT_SCALE_TITLES, INPUT_SCALES, DataError, view_spec
from qcore.figures import qat_curve_figure, training_curve_figure
from qcore.files import shorten
from qcore.models.checkpoint import CheckpointError, checkpoint_bytes
from qcore.models.onnx_import import describe, describe_input, is_onnx
from qcore.models.zoo import ZOO, zoo_model
from qcore.training.qat import (
    HELD_OUT,
    MAX_QAT_EPOCHS,
    QAT_METHODS,
    QatConfig,
    QatProgress,
    checkpoint_of,
    load_checkpoint,
    qat,
    qat_bytes,
)
from qcore.training.train import MAX_EPOCHS, MAX_TRAIN_BATCH, TrainConfig, TrainProgress, train
from ui import cache, session
from ui.card import model_card

TRAIN_STATE_KEY = "qlab_training"
TRAIN_HISTORY_KEY = "qlab_train_history"
QAT_STATE_KEY = "qlab_qat"
QAT_HISTORY_KEY = "qlab_qat_history"
QAT_BITS = [2, 3, 4, 5, 6, 7, 8]
CURVE_EVERY = 200  # steps between redraws of the live training curve
MUCH_WORSE_POINTS = 1.0  # a trained model this much below the one it replaced gets a warning


def warn_if_cancelled(state_key: str, what: str) -> None:
    """A run still marked running was interrupted (Cancel, or the user moved on): it is cancelled, and
    the previous model was kept."""
    previous = st.session_state.get(state_key)
    if previous and previous["status"] == "running":
        previous["status"] = "cancelled"
    if previous and previous["status"] == "cancelled":
        st.warning(f"{what} was cancelled after {previous['steps']} steps; the previous model is kept.")


session.require_navigation()  # first: a deep link on a fresh server may run this page alone
st.title("Model")
entry = session.current_model()
st.markdown(
    "Quantization starts from a trained float network. Choose one of the zoo's models (each comes with "
    "its dataset); the choice is part of the page's link."
)
IMPORTED_CHOICE = "your-onnx-model"
names = list(ZOO) + ([IMPORTED_CHOICE] if entry.imported is not None else [])
chosen = st.selectbox(
    "Model",
    names,
    index=names.index(IMPORTED_CHOICE if entry.imported is not None else entry.zoo),
    format_func=lambda name: (
        "Your ONNX model (uploaded below)" if name == IMPORTED_CHOICE else f"{ZOO[name].title}: {ZOO[name].name}"
    ),
)  # no key: the widget follows the session's model (Back to the previous model changes it too)
if chosen != (IMPORTED_CHOICE if entry.imported is not None else entry.zoo):
    try:
        session.switch_model(chosen)
    except (CheckpointError, DataError) as error:  # a damaged bundled file: say so, keep the model
        st.error("That model could not be loaded; the current model is kept.")
        session.plain_text(str(error))
    else:
        st.rerun()
spec = zoo_model(entry.zoo)
layers = entry.graph.layers
dataset = entry.dataset
if entry.imported is not None:
    st.markdown("**Your ONNX model**, imported into the lab's model graph:")
    session.plain_text(describe(dataset, entry.imported))  # the producer's name comes from the file
    for line in describe_input(entry.imported):
        session.plain_text(f"- {line}")  # the step's operations and the output's name come from the file
else:
    st.markdown(f"**{spec.title}**: {spec.description}.")
model_card(entry)
if entry.imported is not None and entry.input_view != "normalized":
    seen = view_spec(dataset, entry.input_scale, entry.imported.input_affine)
    st.latex(rf"x = \frac{{\text{{pixel}}/255 - {seen.mean:.6g}}}{{{seen.std:.6g}}}")
    st.caption(
        f"This model reads {INPUT_SCALE_TITLES[entry.input_scale]}"
        + (", then its file's own input step" if entry.imported.input_steps else "")
        + f": the x above is what reaches {layers[0]}; quantizing the input means quantizing this x."
    )
else:
    st.latex(rf"x = \frac{{\text{{pixel}}/255 - {dataset.mean}}}{{{dataset.std}}}")
    st.caption(
        f"Every {dataset.title} image is scaled and standardized like this (the mean and standard deviation of "
        f"its training pixels) before it reaches {layers[0]}; quantizing the input means quantizing this x."
    )
st.subheader("Current model")
session.plain_text(entry.name)  # an upload's name is untrusted; its fingerprint is in the card above
previous = session.previous_model()
if previous is not None:
    session.plain_text(f"Previous model: {previous.name} ({previous.fingerprint})")
    if st.button("Back to the previous model", key="back_to_previous"):
        session.restore_model(previous)
        st.rerun()

folder = session.data_folder()
try:
    mnist = cache.shared_data(folder)
    st.caption(f"{dataset.title}: {len(mnist.train)} training and {len(mnist.test)} test images, held in memory.")
except DataError as error:
    session.show_data_error(error)
    mnist = None

# The outcome of a training run, above the tabs: its rerun opens the first tab again.
if "qlab_train_message" in st.session_state:
    st.success(st.session_state.pop("qlab_train_message"))
if "qlab_train_warning" in st.session_state:
    st.warning(st.session_state.pop("qlab_train_warning"))

bundled_tab, upload_tab, train_tab, qat_tab = st.tabs(
    ["Bundled net", "Upload a checkpoint", "Train a new net", "Quantization-aware training"]
)
recipe = TrainConfig(**spec.recipe)  # type: ignore[arg-type]
# a QAT model's float weights load as a zoo state_dict only for the notebook's net (others hold folded weights)
weights_load_as_zoo = spec.is_notebook_net and entry.imported is None

with bundled_tab:
    st.markdown(
        f"Trained by `python -m qcore train --model {spec.name}`: SGD{' (Nesterov)' * (recipe.optimizer != 'sgd')} "
        f"lr {recipe.lr}, momentum {recipe.momentum}, batch {recipe.batch_size}, {recipe.epochs} epochs"
        f"{', weight decay ' + str(recipe.weight_decay) if recipe.weight_decay else ''}"
        f"{', one-cycle schedule' if recipe.schedule == 'one-cycle' else ''}, seed {recipe.seed}: "
        f"{session.percent(spec.float_accuracy)} on the {dataset.title} test set."
    )
    if st.button("Use the bundled net", disabled=entry.is_bundled):
        session.switch_model(entry.zoo)
        st.rerun()

with upload_tab:
    st.markdown(
        f"Upload a `state_dict` saved with `torch.save(model.state_dict(), path)` or "
        f"`safetensors.torch.save_file(model.state_dict(), path)` from this architecture ({spec.name})"
        + ", or a QAT checkpoint of any model written by the *Quantization-aware training* tab or "
        "`python -m qcore qat` (it brings its own model). Or bring **your own model as an ONNX file** "
        "(`torch.onnx.export`, tf2onnx, ...): one image tensor "
        "[N, 1, 28, 28] in, 10 scores out, made of convolutions (depthwise too), BatchNorm, linear layers, "
        "ReLU/ReLU6, pooling, residual adds and concatenations (docs/models.md lists what is accepted)."
    )
    with st.container(border=True):
        st.caption("For an ONNX model: the data it is evaluated on, and what it reads")
        onnx_dataset = st.radio(
            "Dataset",
            list(DATASETS),
            format_func=lambda name: DATASETS[name].title,
            horizontal=True,
            key="qlab_onnx_dataset",
        )
        onnx_scale = st.selectbox(
            "The pixels it reads",
            ["auto", *INPUT_SCALES],
            format_func=lambda name: (
                "measure it (the best float accuracy on 1,000 training images)"
                if name == "auto"
                else INPUT_SCALE_TITLES[name]
            ),
            key="qlab_onnx_scale",
        )
    upload = st.file_uploader(
        "Checkpoint (.pt, .pth, .safetensors) or ONNX model (.onnx)",
        type=["pt", "pth", "safetensors", "onnx"],
        key="qlab_upload",
    )
    # a file is imported again when its dataset or pixel convention is changed (overriding what auto measured)
    upload_key = None if upload is None else (upload.file_id, str(onnx_dataset), str(onnx_scale))
    if upload is not None and st.session_state.get("qlab_upload_done") != upload_key:
        st.session_state["qlab_upload_done"] = upload_key
        content = upload.getvalue()
        try:
            if is_onnx(content):
                imported = cache.imported_model(content, str(onnx_dataset), str(onnx_scale))
                session.set_model(imported.module, f"uploaded {upload.name}", imported=imported)
            else:
                model, trained = load_checkpoint(content, entry.zoo, follow_qat=True)
                if trained is not None:
                    own = {"imported": trained.imported} if trained.imported is not None else {"zoo": trained.zoo}
                    session.set_model(model, f"uploaded QAT {upload.name}", qat=trained, **own)
                    st.session_state[session.PENDING_SETTINGS_KEY] = trained.config.to_dict()
                else:
                    session.set_model(model, f"uploaded {upload.name}", zoo=entry.zoo)
        except CheckpointError as error:
            st.session_state["qlab_upload_error"] = (shorten(upload.name), error.problems)
        except DataError:  # the chosen dataset is missing here: say which, never the server's path
            missing = DATASETS[str(onnx_dataset)]
            problem = f"{missing.title} is not available on this server ({missing.how_to_get})"
            st.session_state["qlab_upload_error"] = (shorten(upload.name), [problem])
        else:
            st.session_state.pop("qlab_upload_error", None)
            st.rerun()
    if "qlab_upload_error" in st.session_state:
        name, problems = st.session_state["qlab_upload_error"]
        st.error("**The uploaded file was not loaded; the previous model is kept.**")
        session.plain_text(f"File: {name}")  # the name and the reasons quote the file: plain text only
        for problem in problems:
            session.plain_text(f"- {problem}")

with train_tab:
    warn_if_cancelled(TRAIN_STATE_KEY, "Training")
    if entry.imported is not None:
        st.info(
            "Training from scratch follows a zoo model's recipe and architecture: choose a zoo model above to "
            "train one. The Quantization-aware training tab fine-tunes your model as it is."
        )
    with st.form("train_form"):
        first, second, third = st.columns(3)
        epochs = first.number_input("Epochs", 1, MAX_EPOCHS, recipe.epochs)
        batch_size = first.number_input("Batch size", 1, MAX_TRAIN_BATCH, recipe.batch_size)
        lr = second.number_input("Learning rate", 1e-5, 1.0, recipe.lr, format="%.4f")
        momentum = second.number_input("Momentum", 0.0, 0.99, recipe.momentum)
        seed = third.number_input("Seed", 0, 2**31 - 1, recipe.seed)
        samples = third.number_input("Training images (60000 = all)", 64, 60000, 60000, step=64)
        start = st.form_submit_button("Train", disabled=mnist is None or entry.imported is not None)
    if start and mnist is not None:
        config = TrainConfig(
            epochs=int(epochs),
            batch_size=int(batch_size),
            lr=float(lr),
            momentum=float(momentum),
            seed=int(seed),
            train_samples=None if samples >= len(mnist.train) else int(samples),
            optimizer=recipe.optimizer,
            weight_decay=recipe.weight_decay,
            schedule=recipe.schedule,
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
            # The curve is redrawn less often than the bar: each redraw sends the whole history, and
            # redrawing every 20 steps made an epoch in the app 3x slower than on the command line.
            if progress.step % CURVE_EVERY == 0 or progress.step == progress.steps_per_epoch:
                chart.plotly_chart(training_curve_figure(history), key=f"curve_{len(history)}")

        try:
            result = cache.own_run("training", lambda: train(mnist.train, config, on_progress=show, build=spec.build))
        except (ValueError, RuntimeError) as error:  # bad settings, or the device failed mid-run
            state["status"] = "failed"
            st.error("Training failed; the previous model is kept.")
            session.plain_text(str(error))
        else:
            state["status"] = "done"
            st.session_state[TRAIN_HISTORY_KEY] = history
            replaced_accuracy = cache.float_result(entry.fingerprint, folder, entry.model).accuracy
            trained = session.set_model(result.model, "trained here", zoo=spec.name)
            accuracy = cache.float_result(trained.fingerprint, folder, result.model).accuracy
            st.session_state["qlab_train_message"] = (
                f"Trained {config.epochs} epoch(s) on {len(result.history)} steps: test accuracy "
                f"{session.percent(accuracy)}. It is now the current model."
            )
            drop = 100 * (replaced_accuracy - accuracy)
            if drop >= MUCH_WORSE_POINTS:
                st.session_state["qlab_train_warning"] = (
                    f"The new model is {drop:.2f} points below the one it replaced "
                    f"({session.percent(replaced_accuracy)}). **Back to the previous model** (above) restores it."
                )
            st.rerun()

with qat_tab:
    st.markdown(
        "Post-training quantization rounds weights that were trained without knowing they would be rounded. "
        "**Quantization-aware training** fine-tunes them with the quantizer in the forward pass, so the "
        "network learns to live on the grid it will be deployed on: exactly the simulation's quantizer "
        "(per-channel symmetric weights, affine activations, the input quantized, int32 bias)."
    )
    st.latex(r"\hat{x} = s \cdot \mathrm{clamp}\!\left(\mathrm{round}\!\left(\tfrac{x}{s}\right), Q_n, Q_p\right)")
    st.markdown(
        "Rounding has zero derivative almost everywhere, so training could not move a single weight. The "
        "**straight-through estimator** (Bengio et al. 2013) pretends round is the identity on the way back:"
    )
    st.latex(
        r"\frac{\partial \hat{x}}{\partial x} \approx \begin{cases} 1 & Q_n \le x/s \le Q_p \\ "
        r"0 & \text{otherwise} \end{cases}"
    )
    st.markdown(
        "It works because the loss sees the rounded network: a weight whose rounding hurts gets pushed across "
        "a rounding boundary, while values clipped at the edge of the grid stop receiving gradient. "
        "**LSQ** (Esser et al. 2019) also learns every step size s: "
        "∂x̂/∂s = round(x/s) − x/s inside the range and Q_n or Q_p outside, so each scale trades clipping "
        "against rounding error on the real loss, scaled by 1/√(N·Q_p) to learn at the weights' pace. The "
        "simpler alternative keeps the weight scales from PTQ and follows each activation range by a moving "
        "average (method *ste*)."
    )
    warn_if_cancelled(QAT_STATE_KEY, "QAT")
    defaults = QatConfig()
    with st.form("qat_form"):
        first, second, third = st.columns(3)
        qat_weight_bits = first.select_slider("Weight bits", QAT_BITS, defaults.weight_bits, key="qat_weight_bits")
        qat_act_bits = first.select_slider("Activation bits", QAT_BITS, defaults.act_bits, key="qat_act_bits")
        qat_epochs = second.number_input("Epochs", 1, MAX_QAT_EPOCHS, defaults.epochs, key="qat_epochs")
        qat_method = second.radio("Method", list(QAT_METHODS), horizontal=True, key="qat_method")
        qat_edges = second.checkbox(
            "First and last layers at 8 bits",
            key="qat_edge_bits",
            help="As LSQ and most low-bit QAT work do: the input image and the classifier keep 8 bits.",
        )
        qat_adds = second.checkbox(
            "Residual adds at 8 bits",
            key="qat_add_bits",
            help="Only conv and linear inputs at the activation bits, as LSQ quantizes them; adds multiply nothing.",
        )
        qat_samples = third.number_input(
            f"Training images ({60000 - HELD_OUT} = all but the held-out slice)",
            256,
            60000 - HELD_OUT,
            60000 - HELD_OUT,
            step=256,
            key="qat_samples",
        )
        start_qat = st.form_submit_button("Train with quantization", disabled=mnist is None)
    st.caption(
        f"Starts from the current model's float weights and its PTQ grid (the default settings at these bits). "
        f"The curve's accuracy is the quantized model's on the last {HELD_OUT} training images, never trained on."
    )
    if start_qat and mnist is not None:
        qat_config = QatConfig(
            weight_bits=int(qat_weight_bits),
            act_bits=int(qat_act_bits),
            edge_bits=8 if qat_edges else 0,
            add_bits=8 if qat_adds else 0,
            epochs=int(qat_epochs),
            method=str(qat_method),
            train_samples=None if qat_samples >= len(mnist.train) - HELD_OUT else int(qat_samples),
        )
        qat_state = {"status": "running", "steps": 0}
        st.session_state[QAT_STATE_KEY] = qat_state
        st.button("Cancel QAT", help="Stops after the current step; the previous model is kept.")
        qat_bar = st.progress(0.0, text="Calibrating the starting grid…")
        qat_chart = st.empty()
        held_out: list[dict[str, float]] = []
        losses: list[float] = []

        def show_qat(progress: QatProgress) -> None:
            qat_state["steps"] += 1
            losses.append(progress.loss)
            if progress.held_out_accuracy is None:
                return
            global_step = (progress.epoch - 1) * progress.steps_per_epoch + progress.step
            held_out.append({"step": global_step, "accuracy": progress.held_out_accuracy})
            qat_bar.progress(
                progress.fraction_done,
                text=f"Epoch {progress.epoch}/{progress.epochs}, step {progress.step}/{progress.steps_per_epoch}: "
                f"held-out quantized accuracy {session.percent(progress.held_out_accuracy)}",
            )
            qat_chart.plotly_chart(qat_curve_figure(held_out, losses), key=f"qat_curve_{global_step}")

        try:
            result = cache.own_run("qat", lambda: qat(entry.model, mnist, qat_config, on_progress=show_qat))
        except (ValueError, RuntimeError) as error:  # bad settings (QatError is one), or the device failed
            qat_state["status"] = "failed"
            st.error("QAT failed; the previous model is kept.")
            session.plain_text(str(error))
        else:
            qat_state["status"] = "done"
            st.session_state[QAT_HISTORY_KEY] = (result.held_out, result.losses)
            bits = qat_config.quant_config().bits_label
            start_entry = entry if entry.qat is None else entry.start
            trained_from = entry.imported if entry.imported is not None else entry.zoo
            session.set_model(
                result.model,
                f"QAT {bits} ({qat_config.method}) from {entry.name}",
                checkpoint_of(result, trained_from),
                start_entry,
            )
            st.session_state[session.PENDING_SETTINGS_KEY] = result.qnet.config.to_dict()
            st.session_state["qlab_train_message"] = (
                f"Quantization-aware training at {bits} done ({qat_config.epochs} epoch(s), "
                f"{sum(result.seconds_per_epoch):.0f} s). It is now the current model, and the sidebar is set to "
                f"{bits}: the Accuracy page shows float, PTQ and QAT side by side."
            )
            st.rerun()
    if entry.qat is not None:
        try:
            qat_file = qat_bytes(entry.qat)
        except CheckpointError as error:  # larger than a checkpoint the lab loads back: say so, write nothing
            st.caption("This QAT model lives in this session only:")
            session.plain_text(str(error))
        else:
            st.download_button(
                "Download the QAT checkpoint",
                qat_file,
                file_name=session.download_name(entry, "qat_checkpoint", "pt"),
                mime="application/octet-stream",
                key="download_qat",
            )

if st.session_state.get(QAT_HISTORY_KEY) and not start_qat:
    st.caption("The last quantization-aware training run:")
    qat_held_out, qat_losses = st.session_state[QAT_HISTORY_KEY]
    st.plotly_chart(qat_curve_figure(qat_held_out, qat_losses), key="last_qat_curve")

if st.session_state.get(TRAIN_HISTORY_KEY) and not start:  # during a run the live curve is in the tab
    # below the tabs, not in one: after the run's rerun the tabs show their first tab again
    st.caption("The last training run, step by step:")
    st.plotly_chart(training_curve_figure(st.session_state[TRAIN_HISTORY_KEY]), key="last_training_curve")

st.divider()
if entry.imported is not None and entry.qat is None:
    st.download_button(
        "Download the model (the ONNX file it came from)",
        entry.imported.onnx_bytes,
        file_name=session.download_name(entry, "model", "onnx"),
        mime="application/octet-stream",
    )
elif entry.qat is not None and not weights_load_as_zoo:
    st.caption(
        "A QAT model of a BatchNorm network or of an ONNX model holds folded weights, which no zoo architecture loads."
    )
else:
    st.download_button(
        "Download the current checkpoint (state_dict)"
        if entry.qat is None
        else "Download the trained float weights (state_dict; they load as a float model, not as QAT)",
        checkpoint_bytes(entry.model),
        file_name=session.download_name(entry, "state_dict" if entry.qat is None else "float_weights", "pt"),
        mime="application/octet-stream",
    )
