from vlmkit.cli import main
import sys
sys.exit(main())
