import pytest

from vlmkit.archs import names
from vlmkit.cli import build_parser, config_overrides
from vlmkit.archs import from_name
from vlmkit.config import ArchConfig


def test_presets_are_registered_with_their_recipes():
    assert {"llava", "llava-1.5"} <= set(names())
    llava = from_name("llava", scale="paper")
    assert llava.connector.type == "linear" and llava.vision.feature_layer == -2 and llava.vision.select == "patch"
    assert [s.train for s in llava.stages] == [["connector"], ["connector", "llm"]]
    assert llava.vision.name_or_path == "openai/clip-vit-large-patch14"
    v15 = from_name("llava-1.5", scale="paper")
    assert v15.connector.type == "mlp2x_gelu" and v15.vision.pad_to_square
    assert v15.answer_prompt == "Answer the question using a single word or phrase."
    assert v15.vision.name_or_path == "openai/clip-vit-large-patch14-336"


def test_overrides_nested_and_dotted():
    config = from_name("llava-1.5", vision={"feature_layer": -3}, stages__instruct__epochs=5,
                       stages__instruct__lr__llm=0.5)
    assert config.vision.feature_layer == -3
    assert config.stage("instruct").epochs == 5
    assert config.stage("instruct").lr == {"connector": 2e-3, "llm": 0.5, "vision": 2e-4}  # the tiny lrs are kept
    assert config.stage("align").epochs == from_name("llava-1.5").stage("align").epochs


def test_unknown_fields_and_presets_are_errors():
    with pytest.raises(ValueError, match="unknown field"):
        from_name("llava", vision={"feature_layers": 1})
    with pytest.raises(KeyError, match="unknown preset"):
        from_name("llava-9")


def test_dict_round_trip():
    config = from_name("llava-1.5")
    assert ArchConfig.from_dict(config.to_dict()) == config


def test_cli_flags_come_from_the_config():
    argv = ["train", "--preset", "llava", "--instruct.epochs", "3", "--vision.feature-layer", "-1",
            "--align.lr.connector", "0.01", "--bf16", "--instruct.train", "vision,connector,llm"]
    args = build_parser(argv).parse_args(argv)
    config = from_name("llava", **config_overrides(args))
    assert config.stage("instruct").epochs == 3 and config.vision.feature_layer == -1
    assert config.stage("align").lr["connector"] == 0.01 and config.bf16
    assert config.stage("instruct").train == ["vision", "connector", "llm"]


def test_train_help_shows_the_presets_own_defaults(capsys):
    from vlmkit.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--preset", "llava", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--instruct.lr.llm" in text and "--vision.feature-layer" in text
    assert "Peak learning rate of connector when it trains in this stage. (default: 0.003)" in text


def test_serve_flags_are_made_from_the_serve_settings():
    import dataclasses

    from vlmkit.serve.protocol import ServeSettings

    def settings(*flags):
        argv = ["serve", "runs/x", *flags]
        args = build_parser(argv).parse_args(argv)
        return ServeSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServeSettings)})

    assert settings() == ServeSettings()  # one place for every default
    chosen = settings("--max-images", "2", "--batch-wait", "0.5", "--allow-image-urls", "--allowed-host", "A.example",
                      "--allowed-host", "b.example", "--image-url-allow-network", "10.0.0.0/8", "--max-image-side",
                      "100")
    assert (chosen.max_images, chosen.batch_wait, chosen.allow_image_urls, chosen.max_image_side) == (2, 0.5, True, 100)
    assert chosen.allowed_hosts == ("a.example", "b.example") and str(chosen.image_url_allow_networks[0]) == "10.0.0.0/8"
    sub = next(a for a in build_parser(["serve"])._subparsers._group_actions[0].choices.items() if a[0] == "serve")[1]
    documented = {a.dest for a in sub._actions}
    assert {f.name for f in dataclasses.fields(ServeSettings)} <= documented
