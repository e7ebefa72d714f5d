"""Preference tuning of the instruction-tuned model (`make align`): preference data, the
reward model, DPO and IPO, PPO with a KL penalty, GRPO."""
