"""The npgpt command line (installed as the package `npgpt_cli`)."""
