"""sysattn_exp: measure and reduce the yes-bias of vision-language models by moving
decoder attention between the system, image and text tokens."""
