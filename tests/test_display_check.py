"""The launcher's check that napari can open a window, run before Qt loads."""

from conftest import REPO

from napari_robustmedsam import display_check, launch


def test_a_missing_xcb_library_gives_the_command_that_installs_it():
    problem = display_check.display_problem(
        environ={"DISPLAY": ":0"}, platform="linux", loadable=lambda soname: soname != "libxcb-cursor.so.0"
    )
    assert problem is not None
    assert "libxcb-cursor0" in problem and "apt-get install -y libxcb-cursor0" in problem
    assert display_check.INSTALL_SCRIPT in problem


def test_no_display_is_reported_and_a_complete_linux_passes():
    every = lambda soname: True  # noqa: E731
    assert "xvfb-run" in display_check.display_problem(environ={}, platform="linux", loadable=every)
    assert display_check.display_problem(environ={"DISPLAY": ":1"}, platform="linux", loadable=every) is None
    # other systems and an explicit Qt platform are not checked
    none_load = lambda soname: False  # noqa: E731
    assert display_check.display_problem(environ={}, platform="darwin", loadable=none_load) is None
    assert display_check.display_problem(environ={"QT_QPA_PLATFORM": "offscreen"}, platform="linux", loadable=none_load) is None
    assert display_check.display_problem(environ={"WAYLAND_DISPLAY": "wayland-0"}, platform="linux", loadable=none_load) is None
    forced = {"WAYLAND_DISPLAY": "wayland-0", "QT_QPA_PLATFORM": "xcb", "DISPLAY": ":0"}
    assert "missing" in display_check.display_problem(environ=forced, platform="linux", loadable=none_load)


def test_the_install_script_installs_every_package_the_check_asks_for():
    script = (REPO / "scripts" / "install-system-deps.sh").read_text()
    for package in display_check.XCB_LIBRARIES.values():
        assert f" {package} " in script.replace("\\\n", " ").replace("\n", " ") + " ", package


def test_the_launcher_stops_with_the_advice_before_importing_qt(monkeypatch, capsys):
    monkeypatch.setattr(display_check, "display_problem", lambda: "napari cannot open a window: test")
    assert launch.main(["--phantom"]) == 2
    assert "napari cannot open a window: test" in capsys.readouterr().err
