@echo off
rem LoRA Lab installer for Windows.
rem   install.bat              install (or update) .venv, then launch the app
rem   install.bat --no-launch  install only
rem   install.bat --test       install with test tools, then run the test suite
setlocal enabledelayedexpansion
cd /d "%~dp0"
set MODE=launch
if "%1"=="--no-launch" (set MODE=install& shift)
if "%1"=="--test" (set MODE=test& shift)
if "%PYTHON%"=="" set PYTHON=python
%PYTHON% -c "import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)" 2>nul
if errorlevel 1 (
  echo LoRA Lab needs Python 3.10 or newer. Install it from python.org ^(tick "Add to PATH"^), or set PYTHON=C:\path\to\python.exe
  exit /b 1
)
if not exist .venv\Scripts\python.exe (
  echo Creating .venv ...
  %PYTHON% -m venv .venv || exit /b 1
)
set VPY=.venv\Scripts\python.exe
set REQS=requirements.txt
if "%MODE%"=="test" set REQS=requirements-dev.txt
%VPY% -c "import torch" 2>nul
if errorlevel 1 (
  where nvidia-smi >nul 2>nul
  if errorlevel 1 (
    echo Installing PyTorch for the CPU ...
    %VPY% -m pip install torch==2.13.0 || exit /b 1
  ) else (
    echo Installing PyTorch with CUDA ...
    %VPY% -m pip install torch --index-url https://download.pytorch.org/whl/cu128 || exit /b 1
  )
)
%VPY% -m pip install -r %REQS% || exit /b 1
%VPY% -c "import torch, diffusers, peft, transformers, safetensors, yaml" || (
  echo The install finished but the libraries do not import; see the messages above.
  exit /b 1
)
if "%MODE%"=="launch" %VPY% app.py %1 %2 %3 %4 %5 %6
if "%MODE%"=="test" %VPY% -m pytest -q %1 %2 %3 %4 %5 %6
if "%MODE%"=="install" echo Installed. Launch with: .venv\Scripts\python.exe app.py
