# Two commands do all the set-up:  make demo  (the GPT chapter end to end on the CPU)  and  make test.
# the chapters, in reading order: registering a new one means adding it here (doc/new_chapter.md)
CHAPTERS := transformer_basics gpt_minimind bert_address_cls t5_summarization clip llava dinov2 hiera_mae deepseek_v3 compression appendix
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python

.PHONY: setup data demo demo-finetune demo-distill demo-translate demo-address demo-summarize demo-clip demo-llava demo-dino demo-hiera demo-video demo-deepseek demo-compress demo-appendix test lint results docs bench gpu-check clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -e ".[dev]"
	touch $@

# fetch and hash-check the default data of each chapter into $$TUTORIALS_CACHE (each chapter's dataset.py)
data: setup
	for chapter in $(CHAPTERS); do $(PY) -m $$chapter.dataset || exit 1; done

# the project's main job end to end on the CPU: the GPT chapter's tokenizer, pretraining, and samples
demo: data
	$(PY) -m gpt_minimind.train_tokenizer
	$(PY) -m gpt_minimind.train_pretrain
	$(PY) -m gpt_minimind.infer
	$(PY) -m gpt_minimind.export_hf

# the GPT chapter's part 2 after `make demo`: SFT, LoRA, QLoRA, DPO, GRPO, reward model + PPO, each scored by eval.py
demo-finetune: data
	$(PY) -m gpt_minimind.tasks
	$(PY) -m gpt_minimind.train_sft
	$(PY) -m gpt_minimind.train_lora
	$(PY) -m gpt_minimind.train_lora --quantize-bits 4 --out-dir runs/gpt_minimind/qlora --run-name qlora_cpu
	$(PY) -m gpt_minimind.train_dpo
	$(PY) -m gpt_minimind.train_sft --init-from runs/gpt_minimind/sft/final --only-tasks arithmetic \
		--max-iters 1500 --out-dir runs/gpt_minimind/sft_arith --run-name sft_arith_cpu
	$(PY) -m gpt_minimind.train_grpo
	$(PY) -m gpt_minimind.train_reward
	$(PY) -m gpt_minimind.train_ppo
	$(PY) -m gpt_minimind.eval

# distillation: a mixture-of-experts teacher pretrained, then distilled into a dense student half as wide
demo-distill: data
	$(PY) -m gpt_minimind.train_pretrain --use-moe --num-experts 4 --num-experts-per-tok 2 \
		--out-dir runs/gpt_minimind/pretrain_moe --run-name pretrain_moe_cpu
	$(PY) -m gpt_minimind.train_distill

# the BERT chapter end to end: masked-LM pretraining, then the address parser (tagging + province)
demo-address: data
	$(PY) -m bert_address_cls.train_mlm
	$(PY) -m bert_address_cls.train_cls --confusion-png doc/bert_address_cls_confusion.png
	$(PY) -m bert_address_cls.infer

# the T5 chapter end to end (~50 minutes on 2 cores): span corruption, headline fine-tuning, the random-init control
demo-summarize: data
	$(PY) -m t5_summarization.train_pretrain
	$(PY) -m t5_summarization.train_summarize
	$(PY) -m t5_summarization.train_summarize --init-from "" --out-dir runs/t5_summarization/summarize_random \
		--run-name random_init_cpu
	$(PY) -m t5_summarization.infer --limit 20 --samples 5

# CLIP from scratch on easy-VQA's pictures: contrastive training, then zero-shot and retrieval on the test split
demo-clip: data
	$(PY) -m clip.train_clip

# LLaVA on the CLIP of demo-clip (trained and exported first if runs/clip/hf is missing) and SmolLM2-135M-Instruct:
# stage 1 (projector), stage 2 (LoRA), about 20 minutes on 2 cores; then one answer about a test picture
demo-llava: data
	test -f runs/clip/hf/config.json || { test -f runs/clip/train/final/config.json || $(PY) -m clip.train_clip; \
		$(PY) -m clip.export_hf; }
	$(PY) -m llava.train_stage1
	$(PY) -m llava.train_stage2
	$(PY) -m llava.infer --image $$($(PY) -c "from llava.dataset import easy_vqa_files; print(easy_vqa_files() / 'test/images/0.png')") \
		--question "what is the red shape?"

# DINOv2 from scratch on animal-mnist (about 15 minutes on 2 cores), then its features judged: k-NN and a linear
# probe against raw pixels and random weights, search by image
demo-dino: data
	$(PY) -m dinov2.train_dino
	$(PY) -m dinov2.eval_linear
	$(PY) -m dinov2.infer --retrieval
	$(PY) -m dinov2.infer --query 0

# Hiera pretrained as a masked autoencoder on animal-mnist (about 14 minutes on 2 cores), then fine-tuned, and the
# same fine-tuning from random weights (about 4 minutes each); a reconstruction and a classified held-out image
demo-hiera: data
	$(PY) -m hiera_mae.train_mae
	$(PY) -m hiera_mae.train_finetune
	$(PY) -m hiera_mae.train_finetune --scratch --out-dir runs/hiera_mae/finetune_scratch
	$(PY) -m hiera_mae.infer --index 7
	$(PY) -m hiera_mae.infer --mae runs/hiera_mae/mae/final --index 7

# Hiera on clips of moving digits: video MAE, fine-tuning, and the from-scratch control (train_video.py)
demo-video: data
	$(PY) -m hiera_mae.train_video
	$(PY) -m hiera_mae.infer --ckpt runs/hiera_mae/video/finetune_mae/final --eval

# DeepSeek-V3 small on the Chinese corpus (about 7 minutes on 2 cores), then the controls: no balancing, a balance
# loss, no MTP, simulated FP8 (about 7 minutes each); decoding speed and the KV cache; a speculative generation
demo-deepseek: data
	$(PY) -m deepseek_v3.train
	$(PY) -m deepseek_v3.train --balance none --run-name balance_none_cpu --out-dir runs/deepseek_v3/none
	$(PY) -m deepseek_v3.train --balance aux --run-name balance_aux_cpu --out-dir runs/deepseek_v3/aux
	$(PY) -m deepseek_v3.train --num-nextn-predict-layers 0 --run-name no_mtp_cpu --out-dir runs/deepseek_v3/no_mtp
	$(PY) -m deepseek_v3.train --fp8-sim --run-name fp8_sim_cpu --out-dir runs/deepseek_v3/fp8
	$(PY) -m deepseek_v3.compare
	$(PY) -m deepseek_v3.bench
	$(PY) -m deepseek_v3.export_hf
	$(PY) -m deepseek_v3.infer --speculative

# compression on SmolLM2-135M and on a never-quantised small Llama trained here (~8 min): every format, GPTQ,
# pruning (each evaluate.py run under 10 minutes on 2 cores), distillation (3 runs of ~6 min), QLoRA ours vs
# bitsandbytes + peft, structured pruning with recovery, the CPU speed and memory bench, one generation
demo-compress: data
	$(PY) -m compression.train_subject
	$(PY) -m compression.evaluate --model smollm2 --methods quant
	$(PY) -m compression.evaluate --model smollm2 --methods gptq --no-save-packed --run-name smollm2_gptq
	$(PY) -m compression.evaluate --model smollm2 --methods gptq --no-act-order --no-save-packed \
		--run-name smollm2_gptq_natural
	$(PY) -m compression.evaluate --model smollm2 --methods prune --no-save-packed --run-name smollm2_prune
	$(PY) -m compression.evaluate --model subject
	$(PY) -m compression.train_distill --mode ce
	$(PY) -m compression.train_distill --mode kd
	$(PY) -m compression.train_distill --mode kd_feat
	$(PY) -m compression.train_qlora
	$(PY) -m compression.train_structured
	$(PY) -m compression.train_structured --dense-control
	$(PY) -m compression.bench
	$(PY) -m compression.report --figure doc/compression_sparsity.png
	$(PY) -m compression.infer --packed runs/compression/eval/smollm2/rtn_nf4_dq

# the appendix: every building block's checks and measurements (about 9 minutes on 2 cores; the figures go to doc/)
demo-appendix: data
	$(PY) -m appendix.rnn
	$(PY) -m appendix.norms --png doc/appendix_norms.png
	$(PY) -m appendix.positions --decay-png doc/appendix_rope_decay.png
	$(PY) -m appendix.attention
	$(PY) -m appendix.linear_attention --png doc/appendix_linear_attention.png
	$(PY) -m appendix.memory
	$(PY) -m appendix.parallel

# the first chapter end to end: train, then translate the test split (greedy + beam, BLEU)
demo-translate: data
	$(PY) -m transformer_basics.train_translate
	$(PY) -m transformer_basics.infer --attention-png runs/transformer_basics/translate/attention.png

# the tests run one thread each (tests/conftest.py), so one worker per core (pytest-xdist); a file's tests stay
# on one worker, so its module fixtures are built once
test: data
	$(PY) -m ruff check .
	HF_HUB_OFFLINE=1 $(PY) -m pytest tests -n auto --dist loadfile

lint: setup
	$(PY) -m ruff check .

# gather every run's results.json into doc/results.{json,md}
results: setup
	$(PY) -m common.results

# the website: every chapter's README beside its annotated source, the syllabus linked to the lines (doc/build.py)
docs: setup
	$(PY) -m doc.build

# copy one chapter out as a project of its own: make starter CHAPTER=gpt_minimind DEST=../my_gpt (see README)
.PHONY: starter
starter: setup
	$(PY) -m common.starter "$(CHAPTER)" "$(DEST)"

# on a CUDA machine: every chapter's --preset gpu4gb for 30 steps under a 3.5 GiB cap (peak memory, bf16
# tokens/s) and the bitsandbytes CUDA paths, into runs/gpu_check/gpu_check.{json,md}; on a CPU, a 2-step dry run
# (no set-up step: a lent GPU machine has no internet; its own python3 is used when there is no venv)
gpu-check:
	$(if $(wildcard $(PY)),$(PY),$(PYTHON)) -m common.gpu_check

bench: setup
	$(PY) -m transformer_basics.bench
	$(PY) -m gpt_minimind.bench

clean:
	rm -rf runs .pytest_cache .ruff_cache site build/site_src build/site_src.mkdocs.yml
