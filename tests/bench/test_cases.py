"""The benchmark's case construction: what makes the trained-LoRA case a concept adaptation."""
import torch

import cases as case_lib


def test_concept_images_have_one_look_per_word_that_varies_per_image():
    tiger = case_lib.concept_images("tiger", 4, 32, seed=0)
    assert tiger.shape == (4, 32, 32, 3) and 0 <= float(tiger.min()) and float(tiger.max()) <= 1
    assert torch.equal(tiger, case_lib.concept_images("tiger", 4, 32, seed=0))  # seeded
    assert not torch.equal(tiger[0], tiger[1])  # every image is another drawing
    apple = case_lib.concept_images("apple", 4, 32, seed=0)
    # the looks differ in colour, not only in jitter: compare the mean colours of the words
    gap_between = (tiger.mean((0, 1, 2)) - apple.mean((0, 1, 2))).abs().max()
    gap_within = (tiger[:2].mean((0, 1, 2)) - tiger[2:].mean((0, 1, 2))).abs().max()
    assert gap_between > 2 * gap_within


def test_teaching_makes_the_base_use_its_captions(bench_env):
    """The random tiny UNet ignores its text; after teaching, an image's own caption predicts its
    noise better than another image's caption or no caption (at this size: 0.074 against 0.107
    shuffled and 0.091 empty)."""
    model, clip, vae = bench_env.demo_models.tiny_sd15(0)
    before = case_lib.effective_weights_digest(model)
    words = [w for w in bench_env.demo_models.load_vocabulary("cifar100") if " " not in w][:8]
    settings = dict(case_lib.TEACHING, images_per_word=4, steps=400, batch_size=32, learning_rate=3e-3)  # about 40 s
    with case_lib.one_thread():
        scale, info = case_lib.teach_concepts(model, clip, vae, words, 0, 32, settings, log=lambda _: None)
    assert case_lib.effective_weights_digest(model) != before
    assert all(not p.requires_grad for p in model.model.diffusion_model.parameters())
    assert scale > 0 and info["taught_words"] == 8
    assert info["teaching_loss_last_50"] < 0.5 * info["teaching_loss_first_50"]
    assert info["loss_own_caption"] < 0.8 * info["loss_shuffled_caption"], info
    assert info["loss_own_caption"] < info["loss_empty_caption"], info


def test_comfyui_train_lora_node_trains_on_this_comfyui(bench_env):
    """The trained-LoRA case calls ComfyUI's TrainLoraNode, whose required inputs grew after
    0.3.75 (five more by 0.19): a short run must train a LoRA that changes the model here."""
    model, clip, vae = bench_env.demo_models.tiny_sd15(0)
    settings = dict(case_lib.LORA_TRAINING, images=2, steps=4, batch_size=1)
    with case_lib.one_thread():
        adapted, info = case_lib.train_lora(model, clip, vae, seed=0, size=32, latent_scale=1.0, settings=settings)
    assert info["lora_tensors"] > 0 and info["weight_patches"] > 0
    assert case_lib.effective_weights_digest(adapted) != case_lib.effective_weights_digest(model)
